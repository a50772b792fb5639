"""In-context rollouts: the model acts in many environments at once, learning from its context.

All tasks x rollouts share one numpy batched env and one batched KV cache. How the
context is kept depends on the variant:
- AD: a sliding window of at most `n_transit` step tokens. When it is full the oldest
  `slide` tokens go at once and the kept ones are re-encoded (one forward pass per
  `slide` steps), so the context holds between n_transit - slide + 1 and n_transit tokens,
  all lengths that training windows cover.
- two-region (`use_compressed_context`): [<compress> previous region </compress>
  <compress> current region]. Each rollout ends its own region when the token-type head
  predicts `</compress>` after its step (`eval_markers: model`), or after
  `compress_interval` steps (`eval_markers: interval`); it is also forced to end after
  n_transit // 2 steps. Then that rollout's previous region is dropped and its
  </compress> and a new <compress> are added, so the context never exceeds n_transit
  steps plus 3 markers. Rollouts whose regions end at different steps hold different
  numbers of tokens: `Context` pads them (see there).
With `use_cache=False` every step re-encodes the whole context instead (the slow
reference): outputs, and so sampled actions, are the same.

Memory ablation (`eval_memory`, to show whether a variant's memory carries the learning):
'drop' (and 'zero') makes the window variants drop every token older than the current
episode at each episode start (with rotary positions dropping is the same as masking), and
the new episode's first token carries no previous action or reward, as at a history's start;
'shuffle' swaps those older tokens for the ones of a rollout on another task. CompressedAD
applies its ablation to the latents after every compression (model/compressed.py).
"""
import numpy as np
import torch

import env as envs
from model.variant import variant_of
from tokens import KIND_END, KIND_START, TOKEN_FIELDS, step_tokens


class Context:
    """The token history of a batch of rollouts (preallocated) and the KV cache encoding it.

    Rows may hold different numbers of tokens (two-region rollouts whose regions end at
    different steps): a shorter row is padded on the left with tokens that nothing attends
    to, and its positions count only its own tokens, so a row's outputs are the same as if
    it ran alone."""

    def __init__(self, model, batch: int, capacity: int, device, use_cache: bool = True):
        self.model, self.device, self.use_cache = model, device, use_cache
        self.buf = {k: torch.zeros(batch, capacity, dtype=torch.long, device=device) for k in TOKEN_FIELDS}
        self.buf["prev_reward"] = self.buf["prev_reward"].float()
        if model.config.state_dim:  # a continuous state is a float vector per token
            self.buf["state"] = torch.zeros(batch, capacity, model.config.state_dim, device=device)
        self.pad = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.ragged = False  # some row holds padding
        self.length, self.capacity = 0, capacity
        self.cache = model.new_cache(batch, capacity, device) if use_cache else None
        self.max_tokens = 0

    def __len__(self):
        return self.length

    @property
    def tokens(self) -> dict:
        return {k: v[:, :self.length] for k, v in self.buf.items()}

    def row_tokens(self, row: int) -> dict:
        """The tokens of one rollout, without its padding."""
        real = ~self.pad[row, :self.length]
        return {k: v[row, :self.length][real] for k, v in self.buf.items()}

    def _attention(self, start: int, n: int):
        return padded_attention(self.pad[:, :start + n], start) if self.ragged else (None, None)

    @torch.no_grad()
    def append(self, new: dict):
        """Add tokens (B, L) and return the model's logits at them ({head: (B, L, ...)})."""
        n = new["kind"].shape[1]
        for k in TOKEN_FIELDS:
            self.buf[k][:, self.length:self.length + n] = new[k]
        self.pad[:, self.length:self.length + n] = False
        start, self.length = self.length, self.length + n
        self.max_tokens = max(self.max_tokens, self.length)
        if self.use_cache:
            mask, pos = self._attention(start, n)
            return self.model(new, cache=self.cache, mask=mask, pos=pos)[0]
        mask, pos = self._attention(0, self.length)
        logits, _ = self.model(self.tokens, mask=mask, pos=pos)
        return {k: v[:, -n:] for k, v in logits.items()}

    @torch.no_grad()
    def permute_rows(self, perm: torch.Tensor):
        """Row r takes the context of row perm[r] (memory ablation 'shuffle'). A row's keys and
        values depend on its own tokens and positions only, so its cache moves with it: no
        re-encoding (which cost a 1,000-token window 8x the time of the rollout itself)."""
        for k in TOKEN_FIELDS:
            self.buf[k][:, :self.length] = self.buf[k][perm, :self.length]
        self.pad[:, :self.length] = self.pad[perm, :self.length]
        if self.use_cache:
            n = self.cache.length
            self.cache.k[:, :, :, :n] = self.cache.k[:, perm, :, :n]
            self.cache.v[:, :, :, :n] = self.cache.v[:, perm, :, :n]

    @torch.no_grad()
    def drop_oldest(self, n: int):
        self._replace({k: v[:, n:self.length] for k, v in self.buf.items()}, self.pad[:, n:self.length])

    @torch.no_grad()
    def replace_rows(self, which: np.ndarray, rows: list[dict]):
        """Give the rows where `which` is True these tokens (one dict of 1-D fields each) and
        encode them; the other rows keep their tokens and cache. Every row stays aligned to
        the right, padded on the left."""
        others = torch.as_tensor(~which, device=self.device)
        longest_other = int((~self.pad[others, :self.length]).sum(1).max()) if others.any() else 0
        self._realign(max(max(len(r["kind"]) for r in rows), longest_other))
        index = torch.as_tensor(np.flatnonzero(which), device=self.device)
        new, new_pad = self._right_aligned(rows, self.length)
        for k in TOKEN_FIELDS:
            self.buf[k][index, :self.length] = new[k]
        self.pad[index, :self.length] = new_pad
        self.ragged = bool(self.pad[:, :self.length].any())
        self.max_tokens = max(self.max_tokens, self.length)
        if self.use_cache:  # encode the new rows alone, then put their keys and values in place
            self._encode_rows(index, new, new_pad)

    def _realign(self, width: int):
        """Make the context `width` columns wide, keeping each row's last min(width, length)
        columns (tokens and cache) so that they end at the last column: a row whose real
        tokens fit in `width` loses only padding."""
        kept = min(width, self.length)
        old, to = slice(self.length - kept, self.length), slice(width - kept, width)
        moved = {k: v[:, old].clone() for k, v in self.buf.items()}
        moved_pad = self.pad[:, old].clone()
        for k in TOKEN_FIELDS:
            self.buf[k][:, to] = moved[k]
        self.pad[:, :width - kept] = True
        self.pad[:, to] = moved_pad
        if self.use_cache:
            moved_k, moved_v = self.cache.k[:, :, :, old].clone(), self.cache.v[:, :, :, old].clone()
            self.cache.k[:, :, :, to], self.cache.v[:, :, :, to] = moved_k, moved_v
            self.cache.length = width
        self.length = width

    def _right_aligned(self, rows: list[dict], width: int) -> tuple[dict, torch.Tensor]:
        """Rows of 1-D token fields as (len(rows), width) tensors, left-padded, and the padding."""
        new = {k: self.buf[k].new_zeros(len(rows), width, *self.buf[k].shape[2:]) for k in TOKEN_FIELDS}
        pad = torch.ones(len(rows), width, dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows):
            n = len(row["kind"])
            for k in TOKEN_FIELDS:
                new[k][i, width - n:] = row[k]
            pad[i, width - n:] = False
        return new, pad

    def _replace(self, kept: dict, pad: torch.Tensor):
        """Hold exactly these tokens and re-encode them (see model/ad.py on why not just
        slice the cache)."""
        kept, pad = {k: v.clone() for k, v in kept.items()}, pad.clone()
        self.length = kept["kind"].shape[1]
        for k in TOKEN_FIELDS:
            self.buf[k][:, :self.length] = kept[k]
        self.pad[:, :self.length] = pad
        self.ragged = bool(pad.any())
        if self.use_cache:
            self.cache.length = 0
            if self.length:
                self._encode_rows(torch.arange(len(pad), device=self.device), kept, pad)

    def _encode_rows(self, index: torch.Tensor, tokens: dict, pad: torch.Tensor):
        """Encode these rows' tokens (B', L) from position 0 into their cache rows, a chunk of
        rows at a time: one pass over every row would hold rows x heads x L x L attention
        weights at once (23.6 GB for 630 rollouts of a 1,000-step window)."""
        L, chunk = pad.shape[1], rows_per_encoding(self.model.config.n_head, pad.shape[1])
        if len(index) == len(self.pad) and chunk >= len(index):  # all rows at once, straight into the cache
            self.cache.length = 0
            self.model(tokens, None, self.cache, *padded_attention_or_none(pad))
            return
        for a in range(0, len(index), chunk):
            rows = index[a:a + chunk]
            cache = self.model.new_cache(len(rows), L, self.device)
            self.model({k: v[a:a + chunk] for k, v in tokens.items()}, None, cache,
                       *padded_attention_or_none(pad[a:a + chunk]))
            self.cache.k[:, rows, :, :L], self.cache.v[:, rows, :, :L] = cache.k, cache.v
        self.cache.length = L


ENCODING_BYTES = 1e9  # attention weights held at once when a context is re-encoded


def rows_per_encoding(n_head: int, tokens: int) -> int:
    """Rows re-encoded together: their heads x tokens x tokens float32 attention weights
    (scores and softmax) within ENCODING_BYTES."""
    return max(1, int(ENCODING_BYTES // (2 * n_head * tokens * tokens * 4)))


def padded_attention_or_none(pad: torch.Tensor):
    return padded_attention(pad, 0) if pad.any() else (None, None)


def padded_attention(pad: torch.Tensor, start: int):
    """(mask, positions) for the tokens from column `start` of rows with this padding (B, L)
    attending to every real token before them; positions count a row's real tokens only."""
    real, L = ~pad, pad.shape[1]
    pos = (real.long().cumsum(1) - 1).clamp(min=0)[:, start:]
    causal = torch.ones(L - start, L, dtype=torch.bool, device=pad.device).tril(start)
    itself = torch.zeros_like(causal)
    itself[torch.arange(L - start), start + torch.arange(L - start)] = True  # a padding query must see something
    return ((real[:, None, :] & causal) | itself)[:, None], pos


def _marker(ctx: Context, kind: int, batch: int) -> dict:
    """A <compress> / </compress> token for each of `batch` rows (zero fields but its kind)."""
    t = {k: ctx.buf[k].new_zeros(batch, 1, *ctx.buf[k].shape[2:]) for k in TOKEN_FIELDS}
    t["kind"].fill_(kind)
    return t


def cat_steps(tokens: list[dict]) -> dict:
    """One (B, L) token dict of L one-step (B, 1) token dicts, oldest first."""
    return {k: torch.cat([t[k] for t in tokens], 1) for k in tokens[0]}


def ablated_memory(memory_tokens: torch.Tensor, memory: str, perm):
    """What a decoder reads of a variant's memory tokens (B, M, E) under the memory ablation:
    the tokens ('keep'), none ('drop'), zeros ('zero') or another task's rollout's, row perm[r] ('shuffle')."""
    if memory == "drop":
        return None
    if memory == "zero":
        return torch.zeros_like(memory_tokens)
    if memory == "shuffle":
        return memory_tokens[perm.to(memory_tokens.device)]
    return memory_tokens


def other_task_rows(batch: int, n_rollouts: int) -> torch.Tensor:
    """For each row (task-major), a row of the next task (of another rollout when there is one task)."""
    shift = n_rollouts if batch > n_rollouts else 1
    return (torch.arange(batch) + shift) % batch


class SlidingWindow:
    """AD: at most n_transit step tokens; slides by `slide` tokens at a time."""

    def __init__(self, ctx: Context, n_transit: int, slide: int, memory: str = "keep", perm=None):
        self.ctx, self.n_transit, self.slide = ctx, n_transit, slide
        self.memory, self.perm = memory, perm

    def start_episode(self) -> bool:
        """Memory ablation: what the new episode may see of the earlier ones; True when it
        sees nothing of them."""
        if self.memory in ("drop", "zero"):
            self.ctx.drop_oldest(len(self.ctx))
            return True
        if self.memory == "shuffle":
            self.ctx.permute_rows(self.perm.to(self.ctx.device))
        return False

    def step(self, token: dict):
        if len(self.ctx) + 1 > self.n_transit:
            self.ctx.drop_oldest(self.slide)
        return self.ctx.append(token)["action"][:, -1]


class TwoRegions:
    """Two-region context, one region decision per rollout; counts region lengths and where
    the region ends came from (the token-type head, or forced by the budget)."""

    def __init__(self, ctx: Context, n_transit: int, interval: int, markers: str, memory: str = "keep", perm=None):
        self.ctx, self.n_transit, self.interval, self.markers = ctx, n_transit, interval, markers
        self.memory, self.perm = memory, perm
        self.batch = ctx.buf["kind"].shape[0]
        self.region_lengths, self.forced_ends, self.head_ends = [], 0, 0
        self._open_first_regions()

    def _open_first_regions(self):
        self.ctx.drop_oldest(len(self.ctx))
        self.ctx.append(_marker(self.ctx, KIND_START, self.batch))
        self.prev_len = np.zeros(self.batch, dtype=np.int64)  # per row: previous region's tokens incl. markers
        self.cur_steps = np.zeros(self.batch, dtype=np.int64)  # per row: steps in the current region

    def start_episode(self) -> bool:
        """Memory ablation: 'drop' starts afresh with one open region; 'shuffle' gives each
        row another row's context, with its region layout."""
        if self.memory in ("drop", "zero"):
            self._open_first_regions()
            return True
        if self.memory == "shuffle":
            self.ctx.permute_rows(self.perm.to(self.ctx.device))
            self.prev_len, self.cur_steps = self.prev_len[self.perm.numpy()], self.cur_steps[self.perm.numpy()]
        return False

    def step(self, token: dict):
        logits = self.ctx.append(token)
        self.cur_steps += 1
        ends = self._region_ends(logits["next_kind"][:, -1])
        if ends.any():
            self._close_regions(ends)
        return logits["action"][:, -1]

    def _region_ends(self, type_logits) -> np.ndarray:
        """Per rollout: does its current region end with this step?"""
        if self.markers == "interval":
            return self.cur_steps >= self.interval
        predicted = (type_logits.argmax(-1) == KIND_END).cpu().numpy()
        forced = ~predicted & (self.cur_steps >= self.n_transit // 2)  # the region's share of the budget is spent
        self.head_ends += int(predicted.sum())
        self.forced_ends += int(forced.sum())
        return predicted | forced

    def _close_regions(self, ends: np.ndarray):
        """Each ending row: its previous region dropped, </compress>, <compress>."""
        end, start = (_marker(self.ctx, kind, 1) for kind in (KIND_END, KIND_START))
        rows = []
        for r in np.flatnonzero(ends):
            row = {k: torch.cat([v[self.prev_len[r]:], end[k][0]]) for k, v in self.ctx.row_tokens(r).items()}
            self.prev_len[r] = len(row["kind"])
            rows.append({k: torch.cat([v, start[k][0]]) for k, v in row.items()})
            self.region_lengths.append(int(self.cur_steps[r]))
        self.cur_steps[ends] = 0
        self.ctx.replace_rows(ends, rows)

    def stats(self) -> dict:
        lengths = np.array(self.region_lengths)
        return {"region_lengths_mean": float(lengths.mean()) if len(lengths) else None,
                "region_lengths_equal_interval": float((lengths == self.interval).mean()) if len(lengths) else None,
                "region_ends_from_head": self.head_ends, "forced_region_ends": self.forced_ends}


def make_policy_context(model, cfg: dict, batch: int, device, use_cache: bool = True, n_rollouts: int = 1):
    """(object with .max_tokens, policy with .step(token) -> action logits and .start_episode()):
    the rollout memory of cfg's variant."""
    perm = other_task_rows(batch, n_rollouts)
    return variant_of(cfg).policy(model, cfg, batch, device, use_cache, cfg["eval_memory"], perm)


def sample_actions(logits: torch.Tensor, uniforms: np.ndarray, greedy: bool, temperature: float = 1.0) -> np.ndarray:
    """Inverse-CDF sampling from pre-drawn uniforms: the same seed gives the same actions
    on any device, and logits that differ only by rounding give the same actions."""
    if greedy:
        return logits.argmax(-1).cpu().numpy()
    cdf = torch.softmax(logits.float() / temperature, -1).cumsum(-1).cpu().numpy()
    actions = (cdf < uniforms[:, None] * cdf[:, -1:]).sum(-1)
    return np.minimum(actions, logits.shape[-1] - 1)


class _one_cpu_thread:
    """Rollouts run many tiny ops: on CPU, extra intra-op threads only add synchronisation
    (measured 20x slower with 2 threads when the other core is busy)."""

    def __init__(self, device):
        self.active = torch.device(device).type == "cpu"

    def __enter__(self):
        if self.active:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.saved)


def rollout(model, cfg: dict, task_indices: list[int], n_episodes: int, n_rollouts: int, seed: int,
            greedy: bool = False, use_cache: bool = True, device=None, progress=None) -> tuple[np.ndarray, dict]:
    """Returns returns of shape (len(task_indices) * n_rollouts, n_episodes), rows task-major
    (row = task_position * n_rollouts + rollout), and stats about the context."""
    device = device or next(model.parameters()).device
    with _one_cpu_thread(device), torch.no_grad():
        return _rollout(model, cfg, task_indices, n_episodes, n_rollouts, seed, greedy, use_cache, device, progress)


def _rollout(model, cfg, task_indices, n_episodes, n_rollouts, seed, greedy, use_cache, device, progress):
    was_training = model.training
    model.eval()
    all_tasks = envs.task_list(cfg)
    tasks = [all_tasks[i] for i in task_indices for _ in range(n_rollouts)]
    env = envs.make_batched_env(cfg, tasks, seed=seed)
    B, n_actions = len(tasks), envs.n_actions(cfg)
    rng = np.random.default_rng(seed)
    ctx, policy = make_policy_context(model, cfg, B, device, use_cache, n_rollouts)
    returns = np.zeros((B, n_episodes), dtype=np.float32)
    prev_action = np.full(B, n_actions)
    prev_reward = np.zeros(B, dtype=np.float32)
    for ep in range(n_episodes):
        states, new_episode = env.reset(), np.ones(B, dtype=np.int64)
        if ep > 0:
            if policy.start_episode():
                # nothing of the last episode, not even its last action and reward: the first
                # token looks like the start of a history
                prev_action, prev_reward = np.full(B, n_actions), np.zeros(B, dtype=np.float32)
        for _ in range(cfg["horizon"]):
            token = step_tokens(envs.state_token(cfg, states), prev_action, prev_reward, new_episode)
            logits = policy.step({k: torch.as_tensor(v, device=device)[:, None] for k, v in token.items()})
            actions = sample_actions(logits, rng.random(B), greedy, cfg["eval_temperature"])
            states, rewards, dones = env.step(actions)
            returns[:, ep] += rewards
            prev_action, prev_reward, new_episode = actions, rewards, dones.astype(np.int64)
        if progress is not None:
            progress(1)
    model.train(was_training)
    stats = {"max_context_tokens": ctx.max_tokens}
    if hasattr(policy, "stats"):  # what a variant's memory reports besides its size
        stats |= policy.stats()
    return returns, stats
