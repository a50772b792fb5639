"""Learning histories without a learner: an expert with decaying noise (`alg: NoisyExpert`).

AD-epsilon (Zisman et al. 2023, "Emergence of in-context reinforcement learning from noise
distillation") replaces the RL learner that makes AD's data by an expert that knows the
task and acts epsilon-greedily: with probability epsilon a uniformly random action,
otherwise the expert's. Epsilon falls from 1 to 0 over a stream's episodes, so each stream
"improves" the way a learner would, but every improvement is one its own history shows
(no other stream's discovery, no hidden weight update).

Here epsilon falls linearly over the first `noise_decay_episodes` episodes of a stream:
episode e (from 0) is played with epsilon = max(0, 1 - e / noise_decay_episodes). The
streams of a task differ only in their random draws, from the task's own generator, so a
task's history does not depend on which other tasks share its chunk. The file layout is
PPO's (compress markers every `n_steps`), so every model variant trains on it unchanged.
"""
import numpy as np

import env as envs
from algorithm.batched_ppo import History
from algorithm.history import steps_per_stream
from algorithm.sb3_ppo import task_seed

CHUNK_TASKS = 256  # tasks stepped together: numpy work per step is shared; memory stays small


def epsilon(cfg: dict, episode: int) -> float:
    return max(0.0, 1.0 - episode / cfg["noise_decay_episodes"])


def run_chunk(cfg: dict, chunk: list[int], tasks: list[dict]) -> dict:
    """{index: history} of every task in `chunk`, n_stream streams each."""
    S, T = cfg["n_stream"], steps_per_stream(cfg)
    copies = [tasks[i] for i in chunk for _ in range(S)]
    batched = envs.make_batched_env(cfg, copies, seed=cfg["alg_seed"])
    expert = envs.expert(cfg, copies)
    generators = [np.random.default_rng(task_seed(cfg["alg_seed"], i)) for i in chunk]
    n_actions = envs.n_actions(cfg)
    record = History(len(chunk), T, S, envs.state_dim(cfg))
    states, episode = batched.reset(), 0
    for t in range(T):
        # each task's draws come from its own generator, in the same order whatever the chunk
        draws = [(g.random(S), g.integers(n_actions, size=S)) for g in generators]
        explore = np.concatenate([u for u, _ in draws]) < epsilon(cfg, episode)
        actions = np.where(explore, np.concatenate([a for _, a in draws]), expert(states))
        next_states, rewards, dones = batched.step(actions)
        record.record(t, states, actions, rewards, next_states, dones)
        states = next_states
        if dones.any():  # every copy shares one clock (Family.make_batched_env)
            states, episode = batched.reset(), episode + 1
    return {index: record.task(slice(k, k + 1), cfg["n_steps"]) for k, index in enumerate(chunk)}


def collect(cfg: dict, indices: list[int], tasks: list[dict], on_done, progress=None):
    """Same contract as batched_ppo.collect: `on_done({index: history})` after each chunk."""
    per_task = steps_per_stream(cfg) * cfg["n_stream"]
    size = cfg["task_chunk"] or CHUNK_TASKS
    for start in range(0, len(indices), size):
        chunk = indices[start:start + size]
        on_done(run_chunk(cfg, chunk, tasks))
        if progress is not None:
            progress(len(chunk), len(chunk) * per_task)
