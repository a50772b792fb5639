"""Reference backend: one Stable-Baselines3 PPO learner per task, tasks in worker processes."""
import multiprocessing as mp
import time

from algorithm.history import n_rollouts
from algorithm.source import task_seed
from runtime import exit_with_parent


def collect_one_task(cfg: dict, task_index: int, task: dict) -> dict:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    import env as envs
    from algorithm.sb3_callback import HistoryLoggerCallback

    torch.set_num_threads(1)  # many tiny learners: threads only add overhead
    vec = DummyVecEnv([lambda: envs.make_gym_env(cfg, task)] * cfg["n_stream"])
    model = PPO("MlpPolicy", vec, n_steps=cfg["n_steps"], batch_size=cfg["batch_size"],
                n_epochs=cfg["n_epochs"], learning_rate=cfg["source_lr"], gamma=cfg["gamma"],
                gae_lambda=cfg["gae_lambda"], clip_range=cfg["clip_range"], ent_coef=cfg["ent_coef"],
                vf_coef=cfg["vf_coef"], max_grad_norm=cfg["max_grad_norm"],
                seed=task_seed(cfg["alg_seed"], task_index), device="cpu", verbose=0)
    logger = HistoryLoggerCallback(cfg["n_steps"])
    model.learn(total_timesteps=n_rollouts(cfg) * cfg["n_steps"] * cfg["n_stream"], callback=logger)
    return logger.history()


def _work(args):
    cfg, index, task = args
    start = time.perf_counter()
    return index, collect_one_task(cfg, index, task), time.perf_counter() - start


def collect(cfg: dict, indices: list[int], tasks: list[dict], on_done, progress=None):
    """Run each task to completion and hand it to `on_done({index: history})` as it finishes."""
    jobs = [(cfg, i, tasks[i]) for i in indices]
    if cfg["n_process"] == 1 or len(jobs) == 1:
        results = map(_work, jobs)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(min(cfg["n_process"], len(jobs)), initializer=exit_with_parent)
        results = pool.imap_unordered(_work, jobs)
    try:
        for index, history, _ in results:
            on_done({index: history})
            if progress is not None:
                progress(1, history["actions"].size)
    finally:
        if pool is not None:
            pool.terminate()
