"""SummaryAD: the model writes its own summary tokens, segment by segment, and reads them back.

The AD transformer (model/ad.py) and nothing else: no separate encoder. The history is cut
into segments of `segment_len` S steps, aligned to the first step of a stream (training) or
of a rollout (evaluation). At the end of each segment the same backbone runs over
[summaries in memory, the segment's S step tokens, K = `n_summary` learned query
embeddings] with causal attention; the queries come last, so they see the memory and the
whole segment, and their outputs (after the final layer norm and a learned linear map)
are the segment's K summary tokens. The memory keeps the summaries of the last
`summary_segments` M segments, the oldest going first. While acting in a segment the
context is [memory (up to M*K tokens), the segment's steps so far]; the write pass at its
end attends to M*K + S + K tokens, the most the model ever attends to.

Positions (rotary): the memory sits at 0..m*K-1 (m segments held so far), the steps
follow, then the queries; the same in training and in a rollout.

Training samples are `train_segments` N consecutive, segment-aligned segments of one
stream. They are processed in order: segment i is decoded with the memory so far (one
pass also writes its summaries), its summaries join the memory, and the loss of every
segment backpropagates through every summary write before it (`summary_grad_segments`
G >= 2 detaches the memory every G segments instead). Because causal attention keeps the
queries out of the steps' outputs, the decoding of a segment and its write are one pass.

Burn-in: a sample starting at segment j > 0 of its stream starts with an empty memory,
which a rollout has only at its start. Its first min(j, M) segments are decoded and write
their summaries (with gradient) but their actions are no targets, so no target is ever
predicted from an empty memory in the middle of a stream; from segment M on the memory is
full, as in a rollout (for 0 < j < M the counted segments before M hold fewer summaries
than a rollout would at that point of the stream, never none).
"""
import torch
import torch.nn as nn
from torch.utils.data import default_collate

from dataset import ADDataset, StepBatches
from errors import ConfigError
from model.ad import AD, KVCache, ModelConfig, _accuracy, _cross_entropy, split_targets
from model.rollout import ablated_memory, cat_steps
from model.variant import Variant, register
from tokens import IGNORE, window_tokens


class SummaryAD(AD):
    def __init__(self, c: ModelConfig, segment_len: int, n_summary: int, summary_segments: int,
                 grad_segments: int = 0):
        super().__init__(c)
        self.segment_len, self.n_summary, self.summary_segments = segment_len, n_summary, summary_segments
        self.grad_segments = grad_segments
        self.queries = nn.Parameter(torch.randn(n_summary, c.n_embd) * 0.02)
        # the backbone's outputs are layer-normed; a summary is read back as an input token,
        # so a learned map lets it take the scale and offset the inputs need
        self.summary_out = nn.Linear(c.n_embd, c.n_embd)
        self._init_weights(self.summary_out)

    @property
    def max_tokens(self) -> int:
        """Tokens of the write pass with a full memory: the most the model attends to."""
        return self.summary_segments * self.n_summary + self.segment_len + self.n_summary

    def segment(self, memory, steps: dict | None, write: bool, cache: KVCache | None = None, batch: int = 0):
        """One backbone pass over [memory, steps, queries if write] after what `cache` holds.
        memory (B, m*K, E) or None; steps a token dict (B, L) or None. Returns (action logits
        at the steps or None, the K new summary tokens (B, K, E) or None)."""
        parts = [] if memory is None else [memory]
        if steps is not None:
            parts.append(self.embed(steps))
        B = parts[0].shape[0] if parts else batch
        if write:
            parts.append(self.queries.expand(B, -1, -1))
        dtype = self.queries.dtype
        h = self.backbone(torch.cat([p.to(dtype) for p in parts], 1), cache)
        n_mem = 0 if memory is None else memory.shape[1]
        logits = None if steps is None else self.action_head(h[:, n_mem:n_mem + steps["prev_action"].shape[1]])
        return logits, self.summary_out(h[:, -self.n_summary:]) if write else None

    def push(self, memory, summaries):
        """The memory after a write: the new summaries last, at most summary_segments segments."""
        memory = summaries if memory is None else torch.cat([memory, summaries], 1)
        return memory[:, -self.summary_segments * self.n_summary:]

    def forward(self, tokens: dict, targets: dict | None = None):
        """(logits, loss) of samples of whole segments (B, N*S): logits {"action": (B, N*S, A)}."""
        S = self.segment_len
        N = tokens["prev_action"].shape[1] // S
        memory, logits = None, []
        for i in range(N):
            if self.grad_segments and i and i % self.grad_segments == 0 and memory is not None:
                memory = memory.detach()  # truncated backpropagation through time
            seg = {k: v[:, i * S:(i + 1) * S] for k, v in tokens.items()}
            out, new = self.segment(memory, seg, write=i < N - 1)  # the last write has no reader
            logits.append(out)
            if new is not None:
                memory = self.push(memory, new)
        logits = {"action": torch.cat(logits, 1)}
        return logits, None if targets is None else _cross_entropy(logits["action"], targets["action"])

    @torch.no_grad()
    def metrics(self, tokens: dict, logits: dict, targets: dict) -> dict:
        return {"loss_action": _cross_entropy(logits["action"], targets["action"]).item(),
                "acc_action": _accuracy(logits["action"], targets["action"])}


def build_summary_model(cfg: dict, inputs: dict) -> SummaryAD:
    return SummaryAD(ModelConfig.from_config(cfg, inputs), cfg["segment_len"], cfg["n_summary"],
                     cfg["summary_segments"], cfg["summary_grad_segments"])


class SummaryADDataset(ADDataset):
    """Samples of `train_segments` N consecutive segments of one stream, starting at a segment
    boundary j * segment_len (every j whose N segments fit the stream); the actions of the
    first min(j, summary_segments) segments are no targets (burn-in, see the module doc)."""

    def __init__(self, path, cfg: dict, part: str = "train", task_indices=None, in_memory=False):
        # the parent's window check reads n_transit, which this variant does not use
        super().__init__(path, cfg | {"n_transit": 1}, part, task_indices, in_memory, two_region=False)
        self.cfg = cfg
        S, N = cfg["segment_len"], cfg["train_segments"]
        if N * S > self.T:
            raise ConfigError(f"train_segments={N} x segment_len={S} = {N * S} steps is longer than a stream "
                              f"({self.T} steps{self.stride_note()}); use train_segments <= {self.T // S} "
                              "or a shorter segment_len")
        self.per_stream = self.T // S - N + 1  # start segments j

    def __getitem__(self, index: int) -> dict:
        task, stream, j = self.locate(int(index))
        S, N = self.cfg["segment_len"], self.cfg["train_segments"]
        sample = window_tokens(self.cfg, self.stream_view(task, stream), j * S, (j + N) * S)
        burn_in = min(j, self.cfg["summary_segments"]) * S
        sample["action"][:burn_in] = IGNORE
        return sample


class SummaryMemory:
    """Rollout context of SummaryAD: the summaries of the last summary_segments segments and
    the current segment's step tokens; at most M*K + S + K tokens however long it runs.

    With the KV cache, a segment's first step re-encodes the memory, later steps append, and
    the write pass appends the queries. Memory ablation (`memory`): the decoder reads no
    summaries ('drop', as in a stream's first segment in training), zeros ('zero') or the
    summaries of the rollout in row perm[r] ('shuffle', another task); the writes keep
    reading the true summaries, so only what the decoder reads changes."""

    def __init__(self, model: SummaryAD, batch: int, device, use_cache: bool = True, memory: str = "keep",
                 perm=None):
        self.model, self.batch, self.use_cache, self.memory, self.perm = model, batch, use_cache, memory, perm
        self.steps: list[dict] = []  # the current segment: one (B, 1) token dict per step
        self.summaries = None  # what the writes produced (B, m*K, E)
        self.visible = None  # what the decoder reads: the summaries, or their ablation
        self.cache = model.new_cache(batch, model.max_tokens, device) if use_cache else None
        self.written, self.max_tokens = 0, 0

    @torch.no_grad()
    def _write(self):
        """End of a segment: write its summaries and push them into the memory."""
        held = 0 if self.summaries is None else self.summaries.shape[1]
        if self.use_cache and self.memory == "keep":  # the cache holds [summaries, segment]
            _, new = self.model.segment(None, None, True, self.cache, self.batch)
        else:
            _, new = self.model.segment(self.summaries, cat_steps(self.steps), True)
        self.max_tokens = max(self.max_tokens, held + len(self.steps) + self.model.n_summary)
        self.summaries = self.model.push(self.summaries, new)
        self.visible = ablated_memory(self.summaries, self.memory, self.perm)
        self.steps, self.written = [], self.written + 1

    def start_episode(self) -> bool:
        """Nothing to do: segments do not follow episodes, and the ablation acts at each write."""
        return False

    def stats(self) -> dict:
        return {"summary_segments_written": self.written}

    @torch.no_grad()
    def step(self, token: dict) -> torch.Tensor:
        if len(self.steps) == self.model.segment_len:
            self._write()
        self.steps.append(token)
        held = 0 if self.visible is None else self.visible.shape[1]
        self.max_tokens = max(self.max_tokens, held + len(self.steps))
        if not self.use_cache:
            return self.model.segment(self.visible, cat_steps(self.steps), False)[0][:, -1]
        first = len(self.steps) == 1
        if first:  # a new segment: re-encode the memory (see model/ad.py on why not slice the cache)
            self.cache.length = 0
        return self.model.segment(self.visible if first else None, token, False, self.cache)[0][:, -1]


class SummaryADVariant(Variant):
    """`model: SummaryAD`: samples of train_segments segments (SummaryADDataset, plain
    batches); rollouts keep the summaries of the last summary_segments segments (SummaryMemory)."""
    name = "SummaryAD"

    def unused_keys(self, cfg: dict) -> tuple:
        return ("n_transit", "region_end_weight")  # segments set the context; no token-type head

    def check_config(self, cfg: dict):
        if cfg["use_compressed_context"]:
            raise ConfigError("use_compressed_context=true is the two-region mode of model: AD; "
                              "SummaryAD summarises segments instead: set one of them")
        if cfg["train_segments"] <= cfg["summary_segments"]:
            raise ConfigError(f"train_segments={cfg['train_segments']} must exceed summary_segments="
                              f"{cfg['summary_segments']}: a sample that starts mid-stream fills the memory "
                              f"first (no targets); use train_segments >= {cfg['summary_segments'] + 1}")
        if cfg["summary_grad_segments"] == 1:
            raise ConfigError("summary_grad_segments=1 detaches every summary before it is read, so nothing "
                              "trains the summary writes; use 0 (all segments) or 2 and more")

    def build(self, cfg: dict, inputs: dict) -> SummaryAD:
        return build_summary_model(cfg, inputs)

    def dataset(self, path, cfg: dict, part: str):
        return SummaryADDataset(path, cfg, part=part)

    def batches(self, dataset, batch_size, seed, rank, world, start, stop):
        return StepBatches(len(dataset), batch_size, seed, rank, start, stop)

    def collate(self, items: list) -> tuple[dict, dict]:
        return split_targets(default_collate(items))

    def policy(self, model, cfg, batch, device, use_cache, memory, perm):
        summary_memory = SummaryMemory(model, batch, device, use_cache, memory, perm)
        return summary_memory, summary_memory

    def transformer_runs(self, cfg: dict, training: bool) -> list[tuple[int, int]]:
        # one pass per segment over [memory, segment, queries]; training keeps the activations
        # of every segment of a sample for the backward pass
        tokens = cfg["summary_segments"] * cfg["n_summary"] + cfg["segment_len"] + cfg["n_summary"]
        return [(cfg["tf_n_layer"] * (cfg["train_segments"] if training else 1), tokens)]

    def budget_overrides(self, n_transit: int, steps_in_stream: int) -> list[str]:
        return summary_budget(n_transit, steps_in_stream)

    def memory_state_bytes(self, cfg: dict) -> int:
        return cfg["summary_segments"] * cfg["n_summary"] * cfg["tf_n_embd"] * 4  # the summaries (fp32)


def summary_budget(tokens: int, steps_in_stream: int, n_summary: int = 4, segment_len: int = 25,
                   train_segments: int = 12, targets_per_step: int = 1600) -> list[str]:
    """--set items that fit SummaryAD into a budget of `tokens` attended tokens (the memory
    study's n_transit): segments of up to segment_len steps, as many summary segments M as
    M*K + S + K <= tokens allows (at least one), train_segments cut to the stream, and about
    targets_per_step action targets per optimiser step, as the study gives the other variants."""
    S = max(1, min(segment_len, tokens - 2 * n_summary))
    M = max(1, (tokens - S - n_summary) // n_summary)
    N = max(M + 1, min(train_segments, steps_in_stream // S))
    return [f"segment_len={S}", f"n_summary={n_summary}", f"summary_segments={M}", f"train_segments={N}",
            f"train_batch_size={max(2, targets_per_step // (N * S))}"]


register(SummaryADVariant())
