"""The Algorithm Distillation transformer, for plain and two-region compressed context.

Tokens. One token per environment step t embeds what the agent knows when it must act:
the state s_t, the previous action a_{t-1}, the previous reward r_{t-1} and whether s_t
starts a new episode. The token's output predicts a_t, so every step of a window is an
action target (dense supervision) and no action is ever visible to its own prediction.
In compressed-context mode learned `<compress>` / `</compress>` marker tokens open and
close each PPO rollout region, a token-type embedding tells the three kinds apart, and a
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

KIND_STEP, KIND_START, KIND_END = 0, 1, 2  # token kinds; markers are <compress>, </compress>
IGNORE = -100  # target value that the losses skip


@dataclass
class ModelConfig:
    n_state_tokens: int       # distinct (discrete) states: the state is embedded by index
    n_actions: int
    n_embd: int = 64
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.0
    compressed: bool = False  # two-region context with marker tokens and a token-type head
    # factored state embedding: the state index is mixed-radix over these per-dimension
    # cardinalities and each dimension has its own table (empty: one vector per state)
    state_cardinalities: tuple = ()

    @classmethod
    def from_config(cls, cfg: dict, n_state_tokens: int, n_actions: int) -> "ModelConfig":
        cards = ()
        if cfg["state_embedding"] == "factored":
            import env as envs
            cards = tuple(envs.state_cardinalities(cfg))
            assert math.prod(cards) == n_state_tokens, (cards, n_state_tokens)
        return cls(n_state_tokens, n_actions, cfg["tf_n_embd"], cfg["tf_n_layer"], cfg["tf_n_head"],
                   cfg["tf_dropout"], cfg["use_compressed_context"], cards)


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

    A token batch is a dict of (B, L) tensors: `kind` (KIND_*), `state` (state index),
    `prev_action` (n_actions = none), `prev_reward`, `new_episode` (0/1), and for training
    the targets `action` and `next_kind` (IGNORE where there is none).
    """
    # every training step uses every parameter, so DDP need not search the graph for unused ones
    ddp_find_unused_parameters = False

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        E = c.n_embd
        cards = c.state_cardinalities
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
        if c.compressed:
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
        held-out goal cell is made of coordinates that training goals had too."""
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
        if self.config.compressed:
            kind = t["kind"]
            x = torch.where((kind == KIND_STEP).unsqueeze(-1), x, self.marker_emb(kind))
            x = x + self.token_type_emb(kind)
        return self.drop(x)

    def forward(self, tokens: dict, cache=None, mask=None, pos=None, compute_loss: bool = False):
        """Returns (action logits, token-type logits or None); a given KVCache is extended
        in place. With compute_loss, (loss, metrics) instead (so DDP's forward hooks see
        the training pass)."""
        if compute_loss:
            return self._loss(tokens)
        h = self.backbone(self.embed(tokens), cache, mask, pos)
        type_logits = self.type_head(h) if self.config.compressed else None
        return self.action_head(h), type_logits

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self(batch, compute_loss=True)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Total loss and float metrics (loss_action, acc_action, and the token-type ones)."""
        action_logits, type_logits = self(batch)
        loss_action, acc_action = _ce_and_acc(action_logits, batch["action"])
        metrics = {"loss_action": loss_action.item(), "acc_action": acc_action}
        total = loss_action
        if self.config.compressed:
            # a region end is one token in a region's length: weighting it keeps the head from
            # settling on "never" (recall 0.0 on darkroom at the default weight 1)
            weight = torch.tensor([1.0, 1.0, self.region_end_weight], device=type_logits.device)
            loss_type, acc_type = _ce_and_acc(type_logits, batch["next_kind"], weight)
            total = total + self.token_type_loss_weight * loss_type
            # accuracy alone hides a head that never predicts the rare region end: report its recall too
            ends = batch["next_kind"] == KIND_END
            recall_end = (type_logits.argmax(-1)[ends] == KIND_END).float().mean().item() if ends.any() else math.nan
            metrics |= {"loss_token_type": loss_type.item(), "acc_token_type": acc_type,
                        "recall_region_end": recall_end}
        return total, metrics

    token_type_loss_weight, region_end_weight = 0.1, 1.0  # set from the config by build_model

    def new_cache(self, batch: int, capacity: int, device) -> KVCache:
        return KVCache(self.config, batch, capacity, device, next(self.parameters()).dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _ce_and_acc(logits, targets, weight=None):
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_targets, weight=weight, ignore_index=IGNORE)
    valid = flat_targets != IGNORE
    acc = (flat_logits.argmax(-1)[valid] == flat_targets[valid]).float().mean().item() if valid.any() else math.nan
    return loss, acc


def build_model(cfg: dict, n_state_tokens: int, n_actions: int) -> AD:
    model = AD(ModelConfig.from_config(cfg, n_state_tokens, n_actions))
    model.token_type_loss_weight, model.region_end_weight = cfg["token_type_loss_weight"], cfg["region_end_weight"]
    return model
