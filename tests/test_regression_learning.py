"""Regression guard for the whole pipeline: a change that breaks in-context learning fails here.

Collects PPO histories on a 5x5 darkroom (batched backend), trains a small AD and checks
that on held-out goals the return of the last episodes is clearly above the first ones,
and above a no-context baseline. Minutes on 2 CPU cores, hence slow:
    bash scripts/test.sh -m slow -k learning
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["config/algorithm/ppo_darkroom.yaml", "config/env/darkroom.yaml", "config/model/ad_dr.yaml"]


def run(script, *args):
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_ad_learns_in_context_on_held_out_goals(tmp_path):
    sets = ["grid_size=5", "horizon=10", "n_steps=40", "batch_size=40", "n_stream=20",
            "total_source_timesteps=12000", "train_env_ratio=0.8", f"dataset_dir={tmp_path}/data",
            f"run_dir={tmp_path}/runs", "device=cpu"]
    run("collect.py", *CONFIGS[:2], "--set", *sets)
    run("train.py", *CONFIGS, "--set", *sets, "n_transit=60", "train_timesteps=600", "eval_interval=0",
        "test_interval=300")
    run_dir = tmp_path / "runs" / "AD-darkroom-seed0"
    run("evaluate.py", str(run_dir), "--set", *sets, "eval_episodes=30", "eval_rollouts=8")
    returns = np.load(run_dir / "eval_result.npy")
    first, last = returns[:, :3].mean(), returns[:, -5:].mean()
    optimal = np.mean([_optimal(sets, i) for i in _test_tasks(sets)])
    # learning in context: the last episodes are far better than the first ones
    assert last - first > 0.3 * optimal, (first, last, optimal)
    assert last > 0.5 * optimal, (first, last, optimal)


def _cfg(sets):
    sys.path.insert(0, str(ROOT))
    from utils import load_config, parse_set
    return load_config([ROOT / c for c in CONFIGS], parse_set(sets))


def _test_tasks(sets):
    import env as envs
    return envs.tasks_of_split(_cfg(sets), "test")


def _optimal(sets, i):
    import env as envs
    cfg = _cfg(sets)
    return envs.optimal_return(cfg, envs.task_list(cfg)[i])
