"""The Algorithm Distillation transformer, for a plain window and the two-region context.

Tokens (built by model/tokens.py). One token per environment step t embeds what the agent knows when it must act:
the state s_t, the previous action a_{t-1}, the previous reward r_{t-1} and whether s_t
starts a new episode. The token's output predicts a_t, so every step of a window is an
action target (dense supervision) and no action is ever visible to its own prediction.
In two-region mode learned `<compress>` / `</compress>` marker tokens open and
close each rollout region of the source, a token-type embedding tells the three kinds apart, and a
token-type head predicts the kind of the *next* token (so it learns when a region ends).

Positions. Rotary embeddings (RoPE) on queries and keys: attention depends only on the
offset between two tokens, so a context never needs absolute time. When the oldest
tokens are dropped (the window slides or the oldest region goes) the kept tokens are
re-encoded once from position 0 (`Rollout` does this every `slide` steps or once per
region), which keeps cached decoding exactly equal to a full forward pass over the same
context: slicing the cache alone would keep upper-layer states that were computed while
the dropped tokens were still visible.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

from dataset import ADDataset, StepBatches, region_gap
from errors import ConfigError
from model.rollout import Context, SlidingWindow, TwoRegions
from model.variant import Variant, register
from tokens import IGNORE, KIND_END, KIND_STEP, TARGET_FIELDS


@dataclass
class ModelConfig:
    n_state_tokens: int       # distinct discrete states (0 for a continuous state)
    n_actions: int
    n_embd: int = 64
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.0
    two_region: bool = False  # two-region context with marker tokens and a token-type head
    # factored state embedding: the state index is mixed-radix over these per-dimension
    # cardinalities and each dimension has its own table (empty: one vector per state)
    state_cardinalities: tuple = ()
    # continuous state: a float vector of this size, embedded by a learned linear projection
    state_dim: int = 0
    token_type_loss_weight: float = 0.1  # weight of the token-type loss (two-region)
    # class weight of the region end in the token-type loss: a region end is one target in a
    # region's length, and at weight 1 the head settled on "never" (recall 0.0 on darkroom)
    region_end_weight: float = 10.0

    @classmethod
    def from_config(cls, cfg: dict, inputs: dict) -> "ModelConfig":
        """`inputs`: what the environment family gives the model (env.model_inputs)."""
        cards = tuple(inputs.get("state_cardinalities") or ())
        return cls(math.prod(cards) if cards else 0, inputs["n_actions"], cfg["tf_n_embd"], cfg["tf_n_layer"],
                   cfg["tf_n_head"], cfg["tf_dropout"], cfg["use_compressed_context"],
                   cards if cfg["state_embedding"] == "factored" else (), 0 if cards else inputs["state_dim"],
                   cfg["token_type_loss_weight"], cfg["region_end_weight"])


def rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (B, H, L, D) at positions pos (L,) or (B, L)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = pos.to(torch.float32)[..., None] * inv_freq  # (..., L, D/2)
    if angles.dim() == 3:  # per-row positions -> broadcast over heads
        angles = angles[:, None]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Preallocated keys and values of every layer for a batch of growing contexts.

    Appending writes in place (no per-step copy of the whole cache); `length` is the
    number of tokens encoded so far."""

    def __init__(self, c: "ModelConfig", batch: int, capacity: int, device, dtype=torch.float32):
        shape = (c.n_layer, batch, c.n_head, capacity, c.n_embd // c.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity, self.length = capacity, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new tokens' k, v (B, H, L, D) and return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} tokens > capacity {self.capacity}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = c.n_head, c.dropout
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x, pos, cache=None, layer=0, mask=None):
        B, L, E = x.shape
        q, k, v = (t.view(B, L, self.n_head, E // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(E, dim=2))
        q, k = rotate(q, pos), rotate(k, pos)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if mask is None and cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            if mask is None:  # new tokens see the whole cache and the new tokens before them
                P = k.shape[2] - L
                mask = torch.ones(L, P + L, dtype=torch.bool, device=x.device).tril(P)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, L, E))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.attn = SelfAttention(c)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(),
                                 nn.Linear(4 * c.n_embd, c.n_embd), nn.Dropout(c.dropout))

    def forward(self, x, pos, cache=None, layer=0, mask=None):
        x = x + self.attn(self.ln1(x), pos, cache, layer, mask)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Pre-norm causal transformer over embeddings."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)

    def forward(self, x, cache: KVCache | None = None, mask=None, pos=None):
        """x (B, L, E). With a cache the new tokens follow the cached ones, which they see."""
        past_len = 0 if cache is None else cache.length
        if pos is None:
            pos = torch.arange(past_len, past_len + x.shape[1], device=x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cache, i, mask)
        if cache is not None:
            cache.length += x.shape[1]
        return self.ln_f(x)


class AD(nn.Module):
    """Causal transformer over a learning history; predicts the action of every step token.

    `tokens` is a dict of (B, L) tensors: `kind` (KIND_*), `state` (state index, or a
    (B, L, state_dim) float vector), `prev_action` (n_actions = none), `prev_reward`,
    `new_episode` (0/1); `targets` for training: `action` and `next_kind` (IGNORE where there
    is none).
    """
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        E = c.n_embd
        cards = c.state_cardinalities
        if c.state_dim:  # continuous state: a learned projection instead of a table
            self.state_proj = nn.Linear(c.state_dim, E)
        else:
            self.state_emb = nn.Embedding(sum(cards) if cards else c.n_state_tokens, E)
        # first row of each dimension's block in state_emb
        self.register_buffer("state_offsets", torch.tensor([sum(cards[:d]) for d in range(len(cards))]),
                             persistent=False)
        self.prev_action_emb = nn.Embedding(c.n_actions + 1, E)  # + "no previous action"
        self.reward_emb = nn.Linear(1, E)
        self.new_episode_emb = nn.Embedding(2, E)
        self.drop = nn.Dropout(c.dropout)
        self.backbone = Transformer(c)
        self.action_head = nn.Linear(E, c.n_actions)
        if c.two_region:
            self.marker_emb = nn.Embedding(3, E)      # rows 1, 2: learned <compress>, </compress>
            self.token_type_emb = nn.Embedding(3, E)  # step / start marker / end marker
            self.type_head = nn.Linear(E, 3)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def embed_state(self, index: torch.Tensor) -> torch.Tensor:
        """Cell embedding, or the sum of per-coordinate embeddings (factored): then a
        held-out goal cell is made of coordinates that training goals had too; a continuous
        state (..., state_dim) is projected."""
        if self.config.state_dim:
            return self.state_proj(index.to(self.state_proj.weight.dtype))
        cards = self.config.state_cardinalities
        if not cards:
            return self.state_emb(index)
        x = 0
        for d in reversed(range(len(cards))):
            x = x + self.state_emb(index % cards[d] + self.state_offsets[d])
            index = index // cards[d]
        return x

    def embed(self, t: dict) -> torch.Tensor:
        x = (self.embed_state(t["state"]) + self.prev_action_emb(t["prev_action"])
             + self.reward_emb(t["prev_reward"].unsqueeze(-1).to(self.reward_emb.weight.dtype))
             + self.new_episode_emb(t["new_episode"]))
        if self.config.two_region:
            kind = t["kind"]
            x = torch.where((kind == KIND_STEP).unsqueeze(-1), x, self.marker_emb(kind))
            x = x + self.token_type_emb(kind)
        return self.drop(x)

    def forward(self, tokens: dict, targets: dict | None = None, cache=None, mask=None, pos=None):
        """(logits, loss): logits {"action": (B, L, n_actions)} plus {"next_kind": (B, L, 3)}
        (two-region); loss None without targets. A given KVCache is extended in place, with
        `mask` and `pos` for padded rows (model/rollout.py)."""
        h = self.backbone(self.embed(tokens), cache, mask, pos)
        logits = {"action": self.action_head(h)}
        if self.config.two_region:
            logits["next_kind"] = self.type_head(h)
        return logits, None if targets is None else self.loss(logits, targets)

    def loss(self, logits: dict, targets: dict) -> torch.Tensor:
        total = _cross_entropy(logits["action"], targets["action"])
        if self.config.two_region:
            total = total + self.config.token_type_loss_weight * self._token_type_loss(logits, targets)
        return total

    def _token_type_loss(self, logits: dict, targets: dict) -> torch.Tensor:
        weight = torch.tensor([1.0, 1.0, self.config.region_end_weight], device=logits["next_kind"].device)
        return _cross_entropy(logits["next_kind"], targets["next_kind"], weight)

    @torch.no_grad()
    def metrics(self, tokens: dict, logits: dict, targets: dict) -> dict:
        """Float metrics: loss_action, acc_action, and the token-type ones (two-region)."""
        metrics = {"loss_action": _cross_entropy(logits["action"], targets["action"]).item(),
                   "acc_action": _accuracy(logits["action"], targets["action"])}
        if self.config.two_region:
            # accuracy alone hides a head that never predicts the rare region end: report its recall too
            ends = targets["next_kind"] == KIND_END
            predicted = logits["next_kind"].argmax(-1)[ends]
            metrics |= {"loss_token_type": self._token_type_loss(logits, targets).item(),
                        "acc_token_type": _accuracy(logits["next_kind"], targets["next_kind"]),
                        "recall_region_end": (predicted == KIND_END).float().mean().item() if ends.any() else math.nan}
        return metrics

    def new_cache(self, batch: int, capacity: int, device) -> KVCache:
        return KVCache(self.config, batch, capacity, device, next(self.parameters()).dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _cross_entropy(logits, targets, weight=None):
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    return F.cross_entropy(flat_logits, flat_targets, weight=weight, ignore_index=IGNORE)


def _accuracy(logits, targets) -> float:
    predicted, targets = logits.argmax(-1).reshape(-1), targets.reshape(-1)
    valid = targets != IGNORE
    return (predicted[valid] == targets[valid]).float().mean().item() if valid.any() else math.nan


def build_model(cfg: dict, inputs: dict) -> AD:
    return AD(ModelConfig.from_config(cfg, inputs))


class ADVariant(Variant):
    """`model: AD`: a sliding window of n_transit steps; with `use_compressed_context` the
    two-region context (markers around each rollout region, a token-type head)."""
    name = "AD"

    def check_config(self, cfg: dict):
        if not cfg["use_compressed_context"]:
            return
        if cfg["n_transit"] < 2 * cfg["compress_interval"]:
            raise ConfigError(
                f"n_transit={cfg['n_transit']} is smaller than two regions "
                f"(2 x compress_interval = {2 * cfg['compress_interval']}); the two-region "
                f"context needs n_transit >= {2 * cfg['compress_interval']}")
        if cfg["compress_interval"] != cfg["n_steps"]:
            raise ConfigError(
                f"compress_interval={cfg['compress_interval']} differs from n_steps={cfg['n_steps']}: "
                "a region is one rollout of the source, so set compress_interval to the collection's n_steps")
        if cfg["episode_stride"] > 1:  # the data's own episode length is checked again when it is read
            region_gap(cfg["episode_stride"], cfg["horizon"], cfg["compress_interval"])

    def unused_keys(self, cfg: dict) -> tuple:
        return () if cfg["use_compressed_context"] else ("region_end_weight",)  # a two-region loss weight

    def accepts_vector_states(self, cfg: dict) -> bool:
        # the two-region data path builds its marker tokens with one number as the state
        return not cfg["use_compressed_context"]

    def run_prefix(self, cfg: dict) -> str:
        # its own name, so that a two-region run never resumes a plain AD run
        return "AD-tworegion" if cfg["use_compressed_context"] else "AD"

    def build(self, cfg: dict, inputs: dict) -> AD:
        return build_model(cfg, inputs)

    def dataset(self, path, cfg: dict, part: str):
        return ADDataset(path, cfg, part=part)

    def batches(self, dataset, batch_size, seed, rank, world, start, stop):
        return StepBatches(len(dataset), batch_size, seed, rank, start, stop)

    def collate(self, items: list) -> tuple[dict, dict]:
        return split_targets(default_collate(items))

    def policy(self, model, cfg, batch, device, use_cache, memory, perm):
        n_transit = cfg["n_transit"]
        if cfg["use_compressed_context"]:
            ctx = Context(model, batch, n_transit + 4, device, use_cache)  # + 4 markers
            return ctx, TwoRegions(ctx, n_transit, cfg["compress_interval"], cfg["eval_markers"], memory, perm)
        ctx = Context(model, batch, n_transit, device, use_cache)
        return ctx, SlidingWindow(ctx, n_transit, max(1, n_transit // 4), memory, perm)

    def transformer_runs(self, cfg: dict, training: bool) -> list[tuple[int, int]]:
        return [(cfg["tf_n_layer"], cfg["n_transit"] + 4)]  # + 4 two-region markers


def split_targets(batch: dict) -> tuple[dict, dict]:
    """A collated batch -> (tokens, targets): the target fields go to targets."""
    tokens = dict(batch)
    return tokens, {k: tokens.pop(k) for k in TARGET_FIELDS if k in tokens}


register(ADVariant())
