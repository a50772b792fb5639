"""Every source of learning histories by its `alg` name: what collect.py checks, runs and
names in each task's group. PPO learns with torch, by one of two backends (`backend`); the
other sources play a numpy policy step by step (algorithm/policy_loop.py).
"""
from algorithm import noisy_expert, policy_loop, posterior_sampling, q_learning

POLICIES = {"NoisyExpert": noisy_expert.NoisyExpert, "PosteriorSampling": posterior_sampling.PosteriorSampler,
            "QLearning": q_learning.QLearner}


def backend_name(cfg: dict) -> str:
    """What made the histories (written into every task's group): the PPO backend, or the source's module."""
    policy = POLICIES.get(cfg["alg"])
    return policy.__module__.rpartition(".")[2] if policy else cfg["backend"]


def check(cfg: dict):
    """Stop before any work where the source cannot play the family."""
    if cfg["alg"] in POLICIES:
        POLICIES[cfg["alg"]].check(cfg)


def collect(cfg: dict, indices: list[int], tasks: list[dict], on_done, progress=None):
    """Every source's contract: `on_done({index: history})` as tasks finish, `progress(tasks,
    env steps)` as they run."""
    if cfg["alg"] in POLICIES:
        policy_loop.collect(cfg, indices, tasks, on_done, progress, POLICIES[cfg["alg"]])
    elif cfg["backend"] == "sb3":
        from algorithm import sb3_ppo  # torch and SB3 load only where PPO runs
        sb3_ppo.collect(cfg, indices, tasks, on_done, progress)
    else:
        from algorithm import batched_ppo
        batched_ppo.collect(cfg, indices, tasks, on_done, progress)
