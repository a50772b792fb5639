"""Batched backend: independent PPO learners per task (one, or `learners_per_task`), many
tasks computed together.
The network, Adam and PPO-loss gradients are in `algorithm/batched_net.py`; this file
holds the rollouts, the per-chunk learner and the worker processes.

Every learner gets its own Stable-Baselines3-style `MlpPolicy` network, its own Adam
state, its own random stream and its own environment copies (by default one learner per
task with all `n_stream` copies, as SB3 and DICP; `learners_per_task` splits them into
independent learners, whose policies then change only on what their own streams saw); the
learners are only *computed* together. Each layer is one weight tensor with a leading
network dimension (`torch.bmm`), and the numpy batched env steps tasks x streams copies at
once, so one PPO minibatch update for 81 tasks is a few dozen large tensor ops instead of
81 x that many small ones. Nothing is reduced over the learner dimension: advantage
normalisation, losses, gradient-norm clipping and Adam are all per learner, so no
information passes between learners.

Every difference from Stable-Baselines3 PPO (none changes what PPO computes, only how), why
a task's history does not depend on its chunk, and what memory a chunk takes are listed on
docs/collection.md ("The batched backend against SB3").

Parallelism: on CPU a chunk of tasks is split over `n_process` worker processes, each
single-threaded (see `train_chunk` for why not threads); on CUDA one process runs the
chunk on the GPU.
"""
import multiprocessing as mp
import sys
import traceback
from queue import Empty

import numpy as np
import torch

import env as envs
from algorithm.batched_net import (
    HIDDEN,
    BatchedActorCritic,
    BatchedAdam,
    normalize_advantages,
    parameters_per_network,
    ppo_loss_gradients,
)
from algorithm.history import n_rollouts, steps_per_stream
from algorithm.source import History, task_seed
from errors import UserError
from runtime import available_memory, exit_with_parent, pick_device

# ----------------------------------------------------------------------------- observations

class ObsEncoder:
    """SB3's MultiDiscrete preprocessing: one-hot per dimension, concatenated.

    The network is fed where the ones are (obs + offset of each dimension, k = len(nvec)
    indices per observation) and builds the one-hot input itself; rollout buffers then
    store k integers per sample instead of sum(nvec) floats.
    """

    def __init__(self, nvec, device):
        nvec = [int(n) for n in nvec]
        self.dim = sum(nvec)
        self.offsets = torch.tensor(np.cumsum([0] + nvec[:-1]), device=device)

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (..., len(nvec)) integer -> indices of the ones (..., len(nvec)) int64."""
        return obs.long() + self.offsets

    def one_hot(self, obs: torch.Tensor) -> torch.Tensor:
        """The float one-hot vector SB3 feeds its network (..., dim); for tests."""
        out = torch.zeros(*obs.shape[:-1], self.dim, device=obs.device)
        return out.scatter_(-1, self(obs), 1.0)


class BoxEncoder:
    """SB3's Box preprocessing: the observation as floats, unscaled (`preprocess_obs` only
    casts a non-image Box). Rollout buffers store the floats."""

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.float()


def observation_encoder(cfg: dict, device):
    """What the network reads of the family's observation space: the one-hot of each
    MultiDiscrete coordinate (ObsEncoder), or a Box's floats (BoxEncoder)."""
    nvec = envs.state_cardinalities(cfg)
    return BoxEncoder(envs.state_dim(cfg)) if nvec is None else ObsEncoder(nvec, device)


class VisitCounts:
    """Count-based exploration bonus (`count_bonus` c): c / sqrt(N(s')), N(s') the learner's own
    visits so far to the discrete observation s' it arrives at, this visit included.

    Each learner counts only what its own streams saw (nothing passes between learners, as in
    the rest of the backend), and a whole observation is one cell of the count (every
    MultiDiscrete coordinate, e.g. position and has-key), so the bonus knows nothing of the task.
    Counts run over the learner's whole history, not per episode or rollout."""

    def __init__(self, nvec, n_learners: int, streams: int, coef: float):
        self.nvec, self.S, self.coef = [int(n) for n in nvec], streams, coef
        self.counts = np.zeros((n_learners, int(np.prod(self.nvec))), dtype=np.int64)
        self.rows = np.repeat(np.arange(n_learners), streams)

    def bonus(self, next_obs: np.ndarray) -> np.ndarray:
        """Count the arrivals next_obs (B * S, len(nvec)) and return their bonus, (B * S,) float32."""
        cells = np.ravel_multi_index(tuple(next_obs.astype(np.int64).T), self.nvec)
        np.add.at(self.counts, (self.rows, cells), 1)  # two streams arriving at one cell count twice
        return (self.coef / np.sqrt(self.counts[self.rows, cells])).astype(np.float32)


# ----------------------------------------------------------------------------- one chunk

def _gae(rewards, values, dones, last_values, gamma, lam):
    """SB3's GAE over a rollout; all (n_steps, ...), `dones[t]` ends the episode after step t."""
    advantages = torch.empty_like(rewards)
    last = torch.zeros_like(last_values)
    next_values = last_values
    for t in reversed(range(len(rewards))):
        non_terminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_values * non_terminal - values[t]
        last = delta + gamma * lam * non_terminal * last
        advantages[t] = last
        next_values = values[t]
    return advantages, advantages + values


def _sample(logits: torch.Tensor, uniforms: torch.Tensor):
    """Categorical sample by inverse CDF: logits (B, A, m), uniforms (B, m) -> actions
    (B, m) and their log-probabilities."""
    log_p = torch.log_softmax(logits, 1)
    cdf = log_p.exp().cumsum(1)
    actions = (uniforms.unsqueeze(1) >= cdf).sum(1).clamp_(max=logits.shape[1] - 1)
    return actions, log_p.gather(1, actions.unsqueeze(1)).squeeze(1)


def learner_seed(alg_seed: int, task_index: int, learner: int) -> int:
    """Learner 0 of a task has the task's seed (one learner per task: as before learners existed)."""
    if learner == 0:
        return task_seed(alg_seed, task_index)
    return int(np.random.SeedSequence([alg_seed, task_index, learner]).generate_state(1)[0])


class ChunkLearner:
    """PPO on one chunk of tasks: the network, optimizer, env and per-learner generators.

    A task has `learners_per_task` learners of S = n_stream / learners_per_task streams
    each; the batch dimension B runs over (task, learner), task-major, so the streams of a
    task's learners are its n_stream streams in order."""

    def __init__(self, cfg: dict, indices: list, tasks: list, device):
        self.cfg, self.device = cfg, device
        self.L = cfg["learners_per_task"]
        self.B, self.S = len(indices) * self.L, cfg["n_stream"] // self.L
        copies = [tasks[i] for i in indices for _ in range(cfg["n_stream"])]
        self.env = envs.make_batched_env(cfg, copies, seed=cfg["alg_seed"])  # the seed: stochastic families
        self.encode = observation_encoder(cfg, device)
        self.net = BatchedActorCritic(self.B, self.encode.dim, envs.n_actions(cfg), device)
        self.generators = [torch.Generator().manual_seed(learner_seed(cfg["alg_seed"], i, j))
                           for i in indices for j in range(self.L)]
        for slot, g in enumerate(self.generators):
            self.net.init_task(slot, g)
        self.adam = BatchedAdam(self.net.parameters(), cfg["source_lr"])
        self.history = History(self.B, steps_per_stream(cfg), self.S, envs.state_dim(cfg))
        # off: the rollout is then exactly what it was before the bonus existed
        self.counts = (VisitCounts(envs.state_cardinalities(cfg), self.B, self.S, cfg["count_bonus"])
                       if cfg["count_bonus"] else None)

    def _per_learner(self, draw) -> torch.Tensor:
        """Stack one draw per learner from the learner's own generator (chunk-independent)."""
        return torch.stack([draw(g) for g in self.generators], 0).to(self.device)

    def _hot(self, obs: np.ndarray) -> torch.Tensor:
        """Env observations (B * S, state_dim) -> the network's input (B, S, k): one-hot indices or floats."""
        return self.encode(torch.as_tensor(obs, device=self.device).view(self.B, self.S, -1))

    @torch.no_grad()
    def rollout(self, obs: np.ndarray, t0: int):
        """n_steps in every stream; records history from step t0. Returns the next obs
        and the rollout as tensors shaped (B, n_steps * S, ...)."""
        n_steps, B, S, gamma = self.cfg["n_steps"], self.B, self.S, self.cfg["gamma"]
        uniforms = self._per_learner(lambda g: torch.rand(n_steps, S, generator=g))  # (B, n_steps, S)
        keys = ("hot", "actions", "log_prob", "values", "rewards", "dones")
        buf = {k: [] for k in keys}
        for t in range(n_steps):
            hot = self._hot(obs)
            logits, values = self.net.forward(hot)
            actions, log_prob = _sample(logits, uniforms[:, t])
            actions_np = actions.cpu().numpy().reshape(-1)
            next_obs, rewards, dones = self.env.step(actions_np)
            self.history.record(t0 + t, obs, actions_np, rewards, next_obs, dones)
            if self.counts is not None:  # PPO learns from the bonus; the history keeps the env's reward
                rewards = rewards + self.counts.bonus(next_obs)
            rewards_t = torch.as_tensor(rewards, device=self.device).view(B, S)
            if dones.any():
                # every copy shares one clock, so all episodes end together, by truncation:
                # bootstrap with the value of the true last state, as SB3 does on timeouts
                assert dones.all(), "batched env copies must finish together"
                rewards_t = rewards_t + gamma * self.net.forward(self._hot(next_obs))[1]
                next_obs = self.env.reset()
            for k, v in zip(keys, (hot, actions, log_prob, values, rewards_t,
                                   torch.full((B, S), float(dones.any()), device=self.device))):
                buf[k].append(v)
            obs = next_obs
        last_values = self.net.forward(self._hot(obs))[1]
        data = {k: torch.stack(v, 0) for k, v in buf.items()}  # (n_steps, B, S, ...)
        adv, ret = _gae(data["rewards"], data["values"], data["dones"], last_values,
                        gamma, self.cfg["gae_lambda"])
        data.update(advantages=adv, returns=ret)
        # (n_steps, B, S, ...) -> (B, n_steps * S, ...): each learner's samples in one row
        flat = {k: data[k].transpose(0, 1).reshape(B, n_steps * S, *data[k].shape[3:])
                for k in ("hot", "actions", "log_prob", "advantages", "returns")}
        return obs, flat

    def train(self, data: dict):
        """n_epochs over the rollout, minibatches of batch_size, per learner."""
        cfg, n = self.cfg, data["actions"].shape[1]
        m = cfg["batch_size"]
        keys = ("hot", "actions", "log_prob", "advantages", "returns")
        for _ in range(cfg["n_epochs"]):
            perm = self._per_learner(lambda g: torch.randperm(n, generator=g))  # (B, n)
            shuffled = {k: data[k].gather(1, perm.view(*perm.shape, *[1] * (data[k].dim() - 2))
                                          .expand_as(data[k])) for k in keys}
            shuffled["advantages"] = normalize_advantages(shuffled["advantages"], m)
            # per-minibatch views made once per epoch: the update loop is the hot path
            for mb in zip(*(shuffled[k].split(m, dim=1) for k in keys)):
                hot, actions, old_log_prob, advantages, returns = mb
                logits, values = self.net.forward(hot)
                self.net.backward(*ppo_loss_gradients(logits, values, actions, old_log_prob,
                                                      advantages, returns, cfg))
                self.net.clip_grad_norm_(cfg["max_grad_norm"])
                self.adam.step()

    def run(self, progress=None):
        """All rollouts and updates; `progress(0, n_env_steps)` after every rollout and its update."""
        n_steps, R = self.cfg["n_steps"], n_rollouts(self.cfg)
        obs = self.env.reset()
        for r in range(R):
            obs, data = self.rollout(obs, r * n_steps)
            if r < R - 1:  # an update after the last rollout could not change the history
                self.train(data)
            del data
            if progress is not None:  # after the update, so that the rate (and the ETA) include it
                progress(0, self.B * self.S * n_steps)

    def histories(self, indices: list[int]) -> dict:
        L = self.L
        return {index: self.history.task(slice(k * L, (k + 1) * L), self.cfg["n_steps"])
                for k, index in enumerate(indices)}


# ----------------------------------------------------------------------------- entry point

def bytes_per_task(cfg: dict, obs_dim: int) -> int:
    """Rough peak memory per task (see module docstring)."""
    ds = envs.state_dim(cfg)
    # states, next_states float32; actions int16; rewards float32; dones, markers 1 byte;
    # twice: worker processes send a copy back
    history = 2 * steps_per_stream(cfg) * cfg["n_stream"] * (2 * ds * 4 + 2 + 4 + 1 + 1)
    # per sample: ds one-hot indices and an action (int64), 6 float32 fields, twice
    # (the rollout and its shuffled copy)
    rollout = cfg["n_steps"] * cfg["n_stream"] * 2 * ((ds + 1) * 8 + 6 * 4)
    # forward/backward buffers for minibatches (one per learner) and for rollout steps, both branches
    learners = cfg["learners_per_task"]
    activations = 2 * (obs_dim + 4 * HIDDEN) * (learners * cfg["batch_size"] + cfg["n_stream"]) * 4
    # every learner's two-branch MLP: parameters, gradients and Adam's two moments (float32)
    networks = learners * parameters_per_network(obs_dim, envs.n_actions(cfg)) * 4 * 4
    return history + rollout + activations + networks


# task_chunk=0 trains at most this many tasks per chunk: a chunk's histories reach the
# disk only when it ends, so one chunk of 650 Dark Key-to-Door 9x9 tasks kept 31 minutes
# of work (2 cores) at risk; 256 tasks (128 per worker) keep the per-update overhead
# that smaller chunks pay (~0.5 ms per minibatch update per worker, whatever its size)
# near 4% of an update.
AUTO_CHUNK_TASKS = 256


def chunk_size(cfg: dict, n_tasks: int, obs_dim: int, device) -> int:
    if cfg["task_chunk"]:
        return min(cfg["task_chunk"], n_tasks)
    fits = max(1, available_memory(device) // 2 // bytes_per_task(cfg, obs_dim))
    if fits < min(n_tasks, AUTO_CHUNK_TASKS):
        print(f"batched PPO: {n_tasks} tasks do not fit in memory at once; training {fits} at a time "
              "(set task_chunk to choose; results do not depend on it)", file=sys.stderr)
    return min(fits, n_tasks, AUTO_CHUNK_TASKS)


def n_workers(cfg: dict, device) -> int:
    """Worker processes: n_process on CPU (each single-threaded), one process on CUDA."""
    return 1 if device.type == "cuda" else cfg["n_process"]


def train_chunk(cfg: dict, chunk: list[int], tasks: list[dict], device, progress=None) -> dict:
    """Train one chunk of tasks; returns {index: history}.

    On CPU the chunk is split over `n_process` worker processes, each a single-threaded
    learner for its share of the tasks. Measured on 2 cores (2 rollouts of 81 darkroom
    tasks): one single-threaded process 48 s, two worker processes 22 s, two threads in
    one process 48 s (no gain); torch's own intra-op threads were several times slower
    than one thread whenever other processes kept a core busy (threads wait at each op's
    barrier), and the per-update Python and dispatch work (~1 ms) stays serial with
    them. Results do not depend on the split (chunk independence).
    """
    workers = min(n_workers(cfg, device), len(chunk))
    if workers == 1:
        learner = ChunkLearner(cfg, chunk, tasks, device)
        learner.run(progress)
        return learner.histories(chunk)
    groups = [[int(i) for i in g] for g in np.array_split(chunk, workers)]
    ctx = mp.get_context("spawn")  # fork is unsafe once torch has started threads
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cfg, g, tasks, queue), daemon=True) for g in groups]
    for proc in procs:
        proc.start()
    try:
        return _gather(queue, procs, progress)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()


def _worker(cfg: dict, chunk: list[int], tasks: list[dict], queue):
    """A worker process: train its tasks, report env steps, send the histories back."""
    exit_with_parent()
    try:
        torch.set_num_threads(1)
        learner = ChunkLearner(cfg, chunk, tasks, torch.device("cpu"))
        learner.run(lambda n_tasks, n_steps: queue.put(("steps", n_steps)))
        queue.put(("done", learner.histories(chunk)))
    except KeyboardInterrupt:
        pass  # the main process handles Ctrl-C
    except BaseException:
        queue.put(("error", traceback.format_exc()))


def _gather(queue, procs, progress) -> dict:
    """Forward progress and collect results until every worker is done; raise if one fails."""
    results, pending = {}, len(procs)
    while pending:
        try:
            kind, payload = queue.get(timeout=1.0)
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise UserError(f"a batched PPO worker process died (exit code {dead[0]}; out of memory? "
                                "try a smaller task_chunk); finished tasks are saved, rerun to go on") from None
            continue
        if kind == "steps" and progress is not None:
            progress(0, payload)
        elif kind == "done":
            results.update(payload)
            pending -= 1
        elif kind == "error":
            raise RuntimeError(f"a batched PPO worker process failed:\n{payload}")
    return results


def collect(cfg: dict, indices: list[int], tasks: list[dict], on_done, progress=None):
    """Train the PPO learners of every task index, `task_chunk` tasks at a time; after each chunk
    hand its histories to `on_done({index: history})` and call `progress(n_tasks, 0)`
    (env steps are reported with `progress(0, n)` after every rollout)."""
    device = pick_device(cfg["device"])
    obs_dim = observation_encoder(cfg, "cpu").dim
    size = chunk_size(cfg, len(indices), obs_dim, device)
    for start in range(0, len(indices), size):
        chunk = indices[start:start + size]
        on_done(train_chunk(cfg, chunk, tasks, device, progress))
        if progress is not None:
            progress(len(chunk), 0)
