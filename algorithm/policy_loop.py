"""The loop of the sources that play a numpy policy step by step instead of learning with
torch: QLearning (algorithm/q_learning.py), PosteriorSampling (algorithm/posterior_sampling.py)
and NoisyExpert (algorithm/noisy_expert.py).

A policy plays `n_stream` copies of each task of a chunk in one batched env. It is built per
chunk by `Policy(cfg, copies, generators)`, where `generators[k]` is the k-th task's
own random generator: drawing a task's randomness from it, in the same order whatever the
chunk, makes a task's history independent of which other tasks share its chunk. A policy
has `act(states, episode) -> actions` and `observe(next_states, rewards)`; episodes start
together (the batched env's shared clock), and `new_episode()` is called at each start.
The file layout is the same as PPO's (compress markers every `n_steps`), so every model
variant trains on it unchanged.
"""
import numpy as np

import env as envs
from algorithm.history import steps_per_stream
from algorithm.source import History, task_seed

CHUNK_TASKS = 256  # tasks stepped together: numpy work per step is shared; memory stays small


def chunk_size(cfg: dict) -> int:
    """Tasks played together (and held in memory at once)."""
    return cfg["task_chunk"] or CHUNK_TASKS


def bytes_per_task(cfg: dict, policy_bytes_per_stream: int) -> int:
    """Rough peak memory per task of a chunk: its history twice (the record and the arrays handed
    to the file: float32 states and next states, int64 actions, float32 rewards, bool dones,
    int8 markers) and its policy's state per stream (a Q table, a posterior)."""
    history = 2 * steps_per_stream(cfg) * cfg["n_stream"] * (2 * envs.state_dim(cfg) * 4 + 8 + 4 + 1 + 1)
    return history + cfg["n_stream"] * policy_bytes_per_stream


def run_chunk(cfg: dict, chunk: list[int], tasks: list[dict], make_policy, progress=None) -> dict:
    """{index: history} of every task in `chunk`, n_stream streams each; `progress(0, env steps)`
    after every episode, so a bar moves while a chunk of hundreds of tasks runs."""
    S, T = cfg["n_stream"], steps_per_stream(cfg)
    copies = [tasks[i] for i in chunk for _ in range(S)]
    batched = envs.make_batched_env(cfg, copies, seed=cfg["alg_seed"])
    generators = [np.random.default_rng(task_seed(cfg["alg_seed"], i)) for i in chunk]
    policy = make_policy(cfg, copies, generators)
    record = History(len(chunk), T, S, envs.state_dim(cfg))
    states, episode, reported = batched.reset(), 0, 0
    policy.new_episode()
    for t in range(T):
        actions = policy.act(states, episode)
        next_states, rewards, dones = batched.step(actions)
        policy.observe(next_states, rewards)
        record.record(t, states, actions, rewards, next_states, dones)
        states = next_states
        if dones.any():  # every copy shares one clock (Family.make_batched_env)
            states, episode = batched.reset(), episode + 1
            policy.new_episode()
            if progress is not None:
                progress(0, len(copies) * (t + 1 - reported))
                reported = t + 1
    if progress is not None and T > reported:
        progress(0, len(copies) * (T - reported))
    return {index: record.task(slice(k, k + 1), cfg["n_steps"]) for k, index in enumerate(chunk)}


def collect(cfg: dict, indices: list[int], tasks: list[dict], on_done, progress, make_policy):
    """Same contract as batched_ppo.collect: `on_done({index: history})` after each chunk."""
    size = chunk_size(cfg)
    for start in range(0, len(indices), size):
        chunk = indices[start:start + size]
        on_done(run_chunk(cfg, chunk, tasks, make_policy, progress))
        if progress is not None:
            progress(len(chunk), 0)
