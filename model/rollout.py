"""In-context rollouts: the model acts in many environments at once, learning from its context.

All tasks x rollouts share one numpy batched env and one batched KV cache. How the
context is kept depends on the variant:
- AD: a sliding window of at most `n_transit` step tokens. When it is full the oldest
  `slide` tokens go at once and the kept ones are re-encoded (one forward pass per
  `slide` steps), so the context holds between n_transit - slide + 1 and n_transit tokens,
  all lengths that training windows cover.
- two-region (`use_compressed_context`): [<compress> previous region </compress>
  <compress> current region]. A region ends when the token-type head predicts
  `</compress>` for the majority of rollouts (`eval_markers: model`) or after
  `compress_interval` steps (`eval_markers: interval`); it is also forced to end after
  n_transit // 2 steps, so the context never exceeds n_transit steps plus 4 markers. Then
  the previous region is dropped.
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
from model.ad import KIND_END, KIND_START, KIND_STEP

TOKEN_FIELDS = ("kind", "state", "prev_action", "prev_reward", "new_episode")


class Context:
    """The token history of a batch of rollouts (preallocated) and the KV cache encoding it."""

    def __init__(self, model, batch: int, capacity: int, device, use_cache: bool = True):
        self.model, self.device, self.use_cache = model, device, use_cache
        self.buf = {k: torch.zeros(batch, capacity, dtype=torch.float32 if k == "prev_reward" else torch.long,
                                   device=device) for k in TOKEN_FIELDS}
        self.length, self.capacity = 0, capacity
        self.cache = model.new_cache(batch, capacity, device) if use_cache else None
        self.max_tokens = 0

    def __len__(self):
        return self.length

    @property
    def tokens(self) -> dict:
        return {k: v[:, :self.length] for k, v in self.buf.items()}

    @torch.no_grad()
    def append(self, new: dict):
        """Add tokens (B, L) and return the model's outputs at them."""
        n = new["kind"].shape[1]
        for k in TOKEN_FIELDS:
            self.buf[k][:, self.length:self.length + n] = new[k]
        self.length += n
        self.max_tokens = max(self.max_tokens, self.length)
        if self.use_cache:
            return self.model(new, cache=self.cache)
        action_logits, type_logits = self.model(self.tokens)
        return action_logits[:, -n:], None if type_logits is None else type_logits[:, -n:]

    @torch.no_grad()
    def permute_rows(self, perm: torch.Tensor):
        """Row r takes the context of row perm[r] (memory ablation 'shuffle')."""
        kept = {k: v[perm, :self.length].clone() for k, v in self.buf.items()}
        self.drop_oldest(self.length)
        if kept["kind"].shape[1]:
            self.append(kept)

    @torch.no_grad()
    def drop_oldest(self, n: int):
        kept = {k: v[:, n:self.length].clone() for k, v in self.buf.items()}
        self.length -= n
        for k in TOKEN_FIELDS:
            self.buf[k][:, :self.length] = kept[k]
        if self.use_cache:  # re-encode what is kept (see model/ad.py on why not just slice)
            self.cache.length = 0
            if self.length:
                self.model(kept, cache=self.cache)


def _marker(kind: int, batch: int, device) -> dict:
    t = {k: torch.zeros(batch, 1, dtype=torch.long, device=device) for k in TOKEN_FIELDS}
    t["prev_reward"] = t["prev_reward"].float()
    t["kind"].fill_(kind)
    return t


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
        return self.ctx.append(token)[0][:, -1]


class TwoRegions:
    """Two-region context; counts region lengths and how many region ends were forced."""

    def __init__(self, ctx: Context, n_transit: int, interval: int, markers: str, memory: str = "keep", perm=None):
        self.ctx, self.n_transit, self.interval, self.markers = ctx, n_transit, interval, markers
        self.memory, self.perm = memory, perm
        self.batch = ctx.buf["kind"].shape[0]
        self.region_lengths, self.forced_ends = [], 0
        self._open_first_region()

    def _open_first_region(self):
        self.ctx.append(_marker(KIND_START, self.batch, self.ctx.device))
        self.prev_len = 0  # tokens of the previous region incl. its markers
        self.cur_steps = 0

    def start_episode(self) -> bool:
        """Memory ablation: 'drop' starts afresh with one open region; 'shuffle' swaps rows
        (every row has the same region layout, so the markers stay consistent)."""
        if self.memory in ("drop", "zero"):
            self.ctx.drop_oldest(len(self.ctx))
            self._open_first_region()
            return True
        if self.memory == "shuffle":
            self.ctx.permute_rows(self.perm.to(self.ctx.device))
        return False

    def step(self, token: dict):
        action_logits, type_logits = self.ctx.append(token)
        self.cur_steps += 1
        if self._region_ends(type_logits[:, -1]):
            self._close_region()
        return action_logits[:, -1]

    def _region_ends(self, type_logits) -> bool:
        if self.markers == "interval":
            return self.cur_steps >= self.interval
        if self.cur_steps >= self.n_transit // 2:  # the region's share of the budget is spent
            self.forced_ends += 1
            return True
        return bool((type_logits.argmax(-1) == KIND_END).float().mean() > 0.5)

    def _close_region(self):
        device = self.ctx.device
        self.ctx.append(_marker(KIND_END, self.batch, device))
        if self.prev_len:
            self.ctx.drop_oldest(self.prev_len)
        self.prev_len = len(self.ctx)
        self.region_lengths.append(self.cur_steps)
        self.cur_steps = 0
        self.ctx.append(_marker(KIND_START, self.batch, device))


def make_policy_context(model, cfg: dict, batch: int, device, use_cache: bool = True, n_rollouts: int = 1):
    """(object with .max_tokens, policy with .step(token) -> action logits and .start_episode())."""
    memory, perm = cfg["eval_memory"], other_task_rows(batch, n_rollouts)
    if cfg["model"] == "CompressedAD":
        from model.compressed import LatentMemory
        latent_memory = LatentMemory(model, batch, cfg["n_transit"], device, use_cache, memory, perm)
        return latent_memory, latent_memory
    if cfg["use_compressed_context"]:
        ctx = Context(model, batch, cfg["n_transit"] + 4, device, use_cache)  # + 4 markers
        return ctx, TwoRegions(ctx, cfg["n_transit"], cfg["compress_interval"], cfg["eval_markers"], memory, perm)
    ctx = Context(model, batch, cfg["n_transit"], device, use_cache)
    return ctx, SlidingWindow(ctx, cfg["n_transit"], max(1, cfg["n_transit"] // 4), memory, perm)


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
    env = envs.make_batched_env(cfg, tasks)
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
            token = {"kind": np.full(B, KIND_STEP), "state": envs.state_index(cfg, states),
                     "prev_action": prev_action, "prev_reward": prev_reward, "new_episode": new_episode}
            token = {k: torch.as_tensor(np.asarray(v), device=device)[:, None] for k, v in token.items()}
            token["prev_reward"] = token["prev_reward"].float()
            logits = policy.step(token)
            actions = sample_actions(logits, rng.random(B), greedy, cfg["eval_temperature"])
            states, rewards, dones = env.step(actions)
            returns[:, ep] += rewards
            prev_action, prev_reward, new_episode = actions, rewards, dones.astype(np.int64)
        if progress is not None:
            progress(1)
    model.train(was_training)
    stats = {"max_context_tokens": ctx.max_tokens}
    if hasattr(policy, "depth"):
        stats["compression_depth_reached"] = policy.depth
    if isinstance(policy, TwoRegions):
        stats |= {"region_lengths_mean": float(np.mean(policy.region_lengths)) if policy.region_lengths else None,
                  "forced_region_ends": policy.forced_ends}
    return returns, stats
