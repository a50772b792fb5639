"""Regression guard for the whole pipeline: a change that breaks in-context learning fails here.

Collects PPO histories on a 5x5 darkroom (batched backend) once, trains a small model of
each variant (AD, two-region AD, CompressedAD) and checks that on held-out goals the return
of the last episodes is clearly above the first ones and above half of optimal. About two
minutes on 2 CPU cores, hence slow:
    bash scripts/test.sh -m slow -k learning
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["config/algorithm/ppo_darkroom.yaml", "config/env/darkroom.yaml", "config/model/ad_dr.yaml"]
# variant: (model config, run name, train overrides for the 5x5 / 40-step-rollout data below)
VARIANTS = {
    "AD": ("config/model/ad_dr.yaml", "AD-darkroom-seed0", ["n_transit=60"]),
    "AD-tworegion": ("config/model/ad_dr_compressed.yaml", "AD-tworegion-darkroom-seed0",
                     ["compress_interval=40", "n_transit=80", "train_batch_size=12"]),
    "CompressedAD": ("config/model/ad_compressed_dr.yaml", "CompressedAD-darkroom-seed0", ["n_transit=60"]),
}


def run(script, *args):
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("learning")
    sets = ["grid_size=5", "horizon=10", "n_steps=40", "batch_size=40", "n_stream=20",
            "total_source_timesteps=12000", "train_env_ratio=0.8", f"dataset_dir={tmp_path}/data",
            f"run_dir={tmp_path}/runs", "device=cpu"]
    run("collect.py", *CONFIGS[:2], "--set", *sets)
    return tmp_path, sets


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_learns_in_context_on_held_out_goals(small_data, variant):
    tmp_path, sets = small_data
    model_cfg, name, train_sets = VARIANTS[variant]
    run("train.py", *CONFIGS[:2], model_cfg, "--set", *sets, *train_sets, "train_timesteps=600",
        "eval_interval=0", "test_interval=300")
    run_dir = tmp_path / "runs" / name
    run("evaluate.py", str(run_dir), "--set", *sets, "eval_episodes=30", "eval_rollouts=8")
    returns = np.load(run_dir / "eval_result.npy")
    first, last = returns[:, :3].mean(), returns[:, -5:].mean()
    optimal = np.mean([_optimal(sets, i) for i in _test_tasks(sets)])
    # learning in context: the last episodes are far better than the first ones
    assert last - first > 0.3 * optimal, (first, last, optimal)
    assert last > 0.5 * optimal, (first, last, optimal)


def _cfg(sets):
    sys.path.insert(0, str(ROOT))
    from cli import load_config
    from config.loading import parse_set
    return load_config([ROOT / c for c in CONFIGS], parse_set(sets))


def _test_tasks(sets):
    import env as envs
    return envs.tasks_of_split(_cfg(sets), "test")


def _optimal(sets, i):
    import env as envs
    cfg = _cfg(sets)
    return envs.optimal_return(cfg, envs.task_list(cfg)[i])
