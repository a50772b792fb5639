"""CompressedAD: old history folded into K latent tokens by an encoder; memory stays constant.

The decoder is the AD transformer (model/ad.py) over [latents, recent step tokens]. When
the recent context holds `n_transit` steps, its oldest `stage_len = n_transit // 2` steps
form a *stage*: the encoder reads [previous latents, stage tokens, K learned queries]
(bidirectional attention, padding masked out) and its outputs at the query positions are
the new latents. The latents therefore summarise the whole history before the recent
steps, recursively, in a fixed budget of K tokens.

Two keys change what the memory is. `latent_sets` M > 1 keeps the newest M latent sets side
by side (the decoder reads M * K latents) instead of overwriting one set. Without
`encoder_reads_latents` each set summarises its own stage only: the memory is then the last
M stages, each in K tokens, with no recurrence, so a rollout thousands of steps long reads
latents of the same kind as a training sample of depth M.

Training samples hold `compression_depth` d stages (consecutive steps of one stream, each
of a random length in [stage_len // 2, stage_len]) followed by n_transit recent steps with
dense action targets; gradients flow through the last `grad_compression_rounds`
compressions (older ones run without grad to bound memory).

Positions (rotary): in the encoder, previous latents sit at 0..K-1, stage tokens at
K..K+L-1 and all queries at 0, so a row's outputs do not depend on how much padding its
stage got. In the decoder, latents sit at 0..K-1 and recent steps follow.
"""
import torch
import torch.nn as nn

from dataset import BucketBatches, BucketSampler, CompressedADDataset, collate_compressed_batch, stage_len
from errors import ConfigError
from model.ad import AD, Block, KVCache, ModelConfig, _accuracy, _cross_entropy, split_targets
from model.rollout import ablated_memory, cat_steps
from model.variant import Variant, register


class CompressionEncoder(nn.Module):
    def __init__(self, c: ModelConfig, n_latent: int, n_layer: int):
        super().__init__()
        self.n_latent = n_latent
        self.queries = nn.Parameter(torch.randn(n_latent, c.n_embd) * 0.02)
        self.blocks = nn.ModuleList(Block(c) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)

    def forward(self, latents, stage_emb, stage_mask):
        """latents (B, K, E) or None, stage_emb (B, L, E), stage_mask (B, L) bool (True = real)."""
        B, L, _ = stage_emb.shape
        K, device = self.n_latent, stage_emb.device
        queries = self.queries.expand(B, K, -1).to(stage_emb.dtype)
        parts, pos, valid = [], [], []
        if latents is not None:
            parts.append(latents)
            pos.append(torch.arange(K, device=device))
            valid.append(torch.ones(B, K, dtype=torch.bool, device=device))
        parts += [stage_emb, queries]
        pos += [torch.arange(K, K + L, device=device), torch.zeros(K, dtype=torch.long, device=device)]
        valid += [stage_mask, torch.ones(B, K, dtype=torch.bool, device=device)]
        x, pos, valid = torch.cat(parts, 1), torch.cat(pos), torch.cat(valid, 1)
        mask = valid[:, None, None, :]  # every token sees every real token, no token sees padding
        for block in self.blocks:
            x = block(x, pos, None, 0, mask)
        return self.ln_f(x[:, -K:])


class CompressedAD(AD):
    def __init__(self, c: ModelConfig, n_latent: int, enc_n_layer: int, grad_rounds: int,
                 latent_sets: int = 1, encoder_reads_latents: bool = True):
        super().__init__(c)
        self.encoder = CompressionEncoder(c, n_latent, enc_n_layer)
        self.encoder.apply(self._init_weights)
        self.n_latent, self.grad_rounds = n_latent, grad_rounds
        self.latent_sets, self.encoder_reads_latents = latent_sets, encoder_reads_latents

    def compress(self, latents, stage: dict, stage_mask):
        """New latents of one stage; `latents` is the newest set before it (None: none yet)."""
        return self.encoder(latents if self.encoder_reads_latents else None, self.embed(stage), stage_mask)

    def latents_of(self, stages: list[dict]):
        """Fold the stages (oldest first) into latents: the newest `latent_sets` sets side by
        side (oldest first), (B, sets * K, E); None at depth 0."""
        sets = []
        for i, stage in enumerate(stages):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= len(stages) - self.grad_rounds):
                sets = (sets + [self.compress(sets[-1] if sets else None, stage, stage["mask"])])[-self.latent_sets:]
        return torch.cat(sets, 1) if sets else None

    def decode(self, latents, recent: dict, cache: KVCache | None = None):
        """Action logits at the recent step tokens, decoded after the latents."""
        x = self.embed(recent)
        K = 0 if latents is None else latents.shape[1]
        if latents is not None:
            x = torch.cat([latents.to(x.dtype), x], 1)
        h = self.backbone(x, cache)
        return self.action_head(h[:, K:])

    def forward(self, tokens: dict, targets: dict | None = None):
        """(logits, loss) of a collated batch: tokens {"compression_stages": [stage token
        dicts, oldest first], "recent": token dict}; logits {"action"} at the recent steps.
        Rollouts decode step by step through LatentMemory instead."""
        logits = {"action": self.decode(self.latents_of(tokens["compression_stages"]), tokens["recent"])}
        return logits, None if targets is None else _cross_entropy(logits["action"], targets["action"])

    @torch.no_grad()
    def metrics(self, tokens: dict, logits: dict, targets: dict) -> dict:
        return {"loss_action": _cross_entropy(logits["action"], targets["action"]).item(),
                "acc_action": _accuracy(logits["action"], targets["action"]),
                "compression_depth": float(len(tokens["compression_stages"]))}


def build_compressed_model(cfg: dict, inputs: dict) -> CompressedAD:
    c = ModelConfig.from_config(cfg, inputs)
    return CompressedAD(c, cfg["n_latent"], cfg["enc_n_layer"], cfg["grad_compression_rounds"],
                        cfg["latent_sets"], cfg["encoder_reads_latents"])


def split_compressed_batch(batch: dict) -> tuple[dict, dict]:
    """collate_compressed_batch's dict -> (tokens, targets) for CompressedAD.forward."""
    recent, targets = split_targets(batch["recent"])
    return {"compression_stages": batch["compression_stages"], "recent": recent}, targets


class CompressedADVariant(Variant):
    """`model: CompressedAD`: training samples of one compression depth per batch
    (CompressedADDataset, BucketSampler, collate_compressed_batch); rollouts keep latents
    and at most n_transit recent steps (LatentMemory)."""
    name = "CompressedAD"
    # a batch of compression depth 0 does not run the encoder; under DDP the other rank's
    # batch may, so DDP must find the unused parameters of each step (and reduce zeros for them)
    find_unused_parameters = True

    def unused_keys(self, cfg: dict) -> tuple:
        return ("region_end_weight",)  # no token-type head

    def accepts_vector_states(self, cfg: dict) -> bool:
        return False  # the stage padding (dataset._stack) stacks one number per state token

    def check_config(self, cfg: dict):
        if cfg["use_compressed_context"]:
            raise ConfigError("use_compressed_context=true is the two-region mode of model: AD; "
                              "CompressedAD compresses with its encoder instead: set one of them")

    def build(self, cfg: dict, inputs: dict) -> CompressedAD:
        return build_compressed_model(cfg, inputs)

    def dataset(self, path, cfg: dict, part: str):
        return CompressedADDataset(path, cfg, part=part)

    def batches(self, dataset, batch_size, seed, rank, world, start, stop):
        return BucketBatches(BucketSampler(dataset, batch_size, seed=seed, rank=rank, world_size=world), start, stop)

    def collate(self, items: list) -> tuple[dict, dict]:
        return split_compressed_batch(collate_compressed_batch(items))

    def policy(self, model, cfg, batch, device, use_cache, memory, perm):
        latent_memory = LatentMemory(model, batch, cfg["n_transit"], device, use_cache, memory, perm)
        return latent_memory, latent_memory

    def transformer_runs(self, cfg: dict, training: bool) -> list[tuple[int, int]]:
        # the decoder sees the latents + recent steps; in training the encoder keeps activations
        # for the grad_compression_rounds stages gradients flow through, each a stage of up to
        # n_transit // 2 steps between the latents in and the latent queries
        runs = [(cfg["tf_n_layer"], cfg["n_transit"] + cfg["latent_sets"] * cfg["n_latent"])]
        if training:
            rounds = min(cfg["grad_compression_rounds"], cfg["max_compression_depth"])
            runs.append((cfg["enc_n_layer"] * rounds, cfg["n_transit"] // 2 + 2 * cfg["n_latent"]))
        return runs

    def budget_overrides(self, n_transit: int, steps_in_stream: int) -> list[str]:
        # the deepest compression a training stream holds, up to 40 (stage = n_transit // 2 steps)
        deepest = (steps_in_stream - n_transit) // (n_transit // 2)
        return [f"max_compression_depth={min(40, deepest)}"]

    def memory_state_bytes(self, cfg: dict) -> int:
        return cfg["latent_sets"] * cfg["n_latent"] * cfg["tf_n_embd"] * 4  # the latents (fp32)


class LatentMemory:
    """Rollout context of CompressedAD: latents + at most n_transit recent step tokens.

    Same interface as the AD policies in model/rollout.py (`step(token) -> action logits`,
    `start_episode()`, `max_tokens`). Its memory is K + n_transit tokens however long the
    rollout runs.

    Memory ablation (`memory`): after every compression the decoder sees no latents
    ('drop', as at depth 0 in training), zeros ('zero') or the latents of the rollout in row
    perm[r] ('shuffle', another task); the encoder keeps folding the true latents, so only
    what the decoder reads changes."""

    def __init__(self, model: CompressedAD, batch: int, n_transit: int, device, use_cache: bool = True,
                 memory: str = "keep", perm=None):
        self.model, self.n_transit, self.use_cache, self.device = model, n_transit, use_cache, device
        self.memory, self.perm = memory, perm
        self.stage_len = stage_len(n_transit)
        self.recent: list[dict] = []  # one (B, 1) token dict per step
        self.sets: list = []  # the newest latent_sets latent sets the encoder folded, oldest first
        self.visible = None  # what the decoder reads: the latents, or their ablation
        capacity = model.latent_sets * model.n_latent + n_transit
        self.cache = model.new_cache(batch, capacity, device) if use_cache else None
        self.depth, self.max_tokens, self.batch = 0, 0, batch

    @property
    def latents(self):
        """The newest latents the encoder folded (None before the first compression)."""
        return self.sets[-1] if self.sets else None

    @torch.no_grad()
    def _compress(self):
        stage, self.recent = self.recent[: self.stage_len], self.recent[self.stage_len:]
        mask = torch.ones(self.batch, len(stage), dtype=torch.bool, device=self.device)
        self.sets = (self.sets + [self.model.compress(self.latents, cat_steps(stage), mask)])[-self.model.latent_sets:]
        self.visible = ablated_memory(torch.cat(self.sets, 1), self.memory, self.perm)
        self.depth += 1
        if self.use_cache:  # re-encode latents + kept steps
            self.cache.length = 0
            self.model.decode(self.visible, cat_steps(self.recent), self.cache)

    def start_episode(self) -> bool:
        """Nothing to do: the ablation acts at each compression, not at episode starts."""
        return False

    def stats(self) -> dict:
        return {"compression_depth_reached": self.depth}

    @torch.no_grad()
    def step(self, token: dict) -> torch.Tensor:
        if len(self.recent) + 1 > self.n_transit:
            self._compress()
        self.recent.append(token)
        K = 0 if self.visible is None else self.visible.shape[1]
        self.max_tokens = max(self.max_tokens, K + len(self.recent))
        if self.use_cache:
            if self.cache.length == 0 and self.visible is not None:  # cache was never built
                return self.model.decode(self.visible, cat_steps(self.recent), self.cache)[:, -1]
            return self.model.decode(None, token, self.cache)[:, -1]
        return self.model.decode(self.visible, cat_steps(self.recent))[:, -1]


register(CompressedADVariant())
