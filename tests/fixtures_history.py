"""Tiny valid learning-history files for the model, dataset, training and evaluation tests,
built directly (no PPO): a uniformly random policy in the batched darkroom env.

The file follows the dataset format (docs/file-formats.md) exactly as collect.py writes it: it is created with
`algorithm.history.create_if_missing` and filled with `append_tasks`; `compress_markers`
come from `algorithm.history.compress_markers`; `next_states` is the true next state (also
on the last step of an episode) and the state after a done is the reset state.

Sizes: darkroom 5x5 (25 tasks: 22 train, 3 test), horizon 10 (so a 20-step PPO region
holds two episodes and region markers are not episode boundaries), 4 streams of
T = 200 steps (10 regions) per task; 1 of the 4 streams is held out for test/ losses.

Import from a test module (tests/ is on sys.path when pytest runs a test file there):
    from fixtures_history import make_cfg, build_history_file, cli_sets
"""
from pathlib import Path

import numpy as np

import env as envs
from algorithm import history
from algorithm.history import dataset_path
from cli import load_config
from config.loading import parse_set

ROOT = Path(__file__).resolve().parents[1]
ALG = ROOT / "config/algorithm/ppo_darkroom.yaml"
ENV = ROOT / "config/env/darkroom.yaml"
MODEL_AD = ROOT / "config/model/ad_dr.yaml"
MODEL_TWO_REGION = ROOT / "config/model/ad_dr_compressed.yaml"

N_STEPS, N_STREAM, HORIZON, GRID = 20, 4, 10, 5
T = 200  # steps per stream: total_source_timesteps / n_stream, a whole number of regions

# the collection settings (what names and defines the dataset)
DATA_SETS = [f"grid_size={GRID}", f"horizon={HORIZON}", f"n_stream={N_STREAM}", f"n_steps={N_STEPS}",
             "batch_size=20", f"total_source_timesteps={T * N_STREAM}", "test_stream_ratio=0.25"]
# a tiny model and a short training run
MODEL_SETS = ["tf_n_embd=16", "tf_n_layer=1", "tf_n_head=2", "n_transit=40", "train_timesteps=12",
              "train_batch_size=4", "warmup_steps=2", "eval_interval=6", "eval_episodes=2", "eval_rollouts=1",
              "log_interval=2", "test_interval=6", "ckpt_interval=4", "device=cpu", "num_workers=0"]
TWO_REGION_SETS = [f"compress_interval={N_STEPS}"]


def cli_sets(dataset_dir, run_dir=None, compressed: bool = False, extra=()) -> list[str]:
    """The `--set key=value` items of a tiny run (what a test passes to a script)."""
    sets = DATA_SETS + MODEL_SETS + (TWO_REGION_SETS if compressed else []) + [f"dataset_dir={dataset_dir}"]
    if run_dir is not None:
        sets.append(f"run_dir={run_dir}")
    return sets + list(extra)


def config_files(compressed: bool = False) -> list[Path]:
    return [ALG, ENV, MODEL_TWO_REGION if compressed else MODEL_AD]


def make_cfg(dataset_dir, run_dir=None, compressed: bool = False, extra=()) -> dict:
    """The resolved config of a tiny run, through the same loader and --set parsing as the scripts."""
    return load_config(config_files(compressed), parse_set(cli_sets(dataset_dir, run_dir, compressed, extra)))


def random_histories(cfg: dict, task_indices, seed: int = 0) -> dict:
    """{task index: arrays} of a uniformly random policy, time-major (T, n_stream, ...)."""
    all_tasks = envs.task_list(cfg)
    S, T_ = cfg["n_stream"], history.steps_per_stream(cfg)
    task_indices = list(task_indices)
    copies = [all_tasks[i] for i in task_indices for _ in range(S)]  # task-major, stream-minor
    env = envs.make_batched_env(cfg, copies)
    rng = np.random.default_rng(seed)
    N, ds = len(copies), envs.state_dim(cfg)
    out = {k: np.zeros((T_, N, ds) if k in ("states", "next_states") else (T_, N), dtype=dt)
           for k, dt in (("states", np.float32), ("next_states", np.float32), ("actions", np.int64),
                         ("rewards", np.float32), ("dones", bool))}
    states = env.reset()
    for t in range(T_):
        actions = rng.integers(0, envs.n_actions(cfg), N)
        next_states, rewards, dones = env.step(actions)
        out["states"][t], out["actions"][t], out["rewards"][t] = states, actions, rewards
        out["next_states"][t], out["dones"][t] = next_states, dones
        states = env.reset() if dones.all() else next_states
    markers = history.compress_markers(T_, cfg["n_steps"], S)
    results = {}
    for k, i in enumerate(task_indices):
        cols = slice(k * S, (k + 1) * S)
        results[i] = {name: a[:, cols] for name, a in out.items()} | {"compress_markers": markers}
        history.check_history(results[i], cfg, ds)
    return results


def build_history_file(cfg: dict, task_indices=None, seed: int = 0) -> Path:
    """Write (or reuse) the dataset file that `cfg` names; all tasks by default."""
    path = dataset_path(cfg)
    tasks, split = envs.task_list(cfg), envs.task_split(cfg)
    history.create_if_missing(path, cfg, tasks, split)
    have = set(history.read_header(path)["done"])
    wanted = [i for i in (range(len(tasks)) if task_indices is None else task_indices) if i not in have]
    if wanted:
        history.append_tasks(path, random_histories(cfg, wanted, seed), tasks, split, "random")
    return path


def read_stream(path, task: int, stream: int) -> dict:
    """Raw arrays of one stream of one task, straight from the file (for comparisons)."""
    import h5py
    with h5py.File(path, "r") as f:
        g = f[str(task)]
        return {k: g[k][:, stream] for k in history.FIELDS}
