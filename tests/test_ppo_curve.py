"""scripts/ppo_curve.py: the source PPO's curve read back from a history file."""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

import env as envs
from fixtures_history import build_history_file, make_cfg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import ppo_curve  # noqa: E402


def test_fraction_of_optimal_is_each_episodes_return_over_the_tasks_optimum(tmp_path):
    cfg = make_cfg(tmp_path)
    path = build_history_file(cfg)
    split = envs.task_split(cfg)
    frac = ppo_curve.fraction_of_optimal(path, "test")
    test_tasks = [i for i, s in enumerate(split) if s == "test"]
    assert frac.shape[0] == len(test_tasks)
    i, H = test_tasks[0], cfg["horizon"]
    with h5py.File(path, "r") as f:
        rewards = f[str(i)]["rewards"][()]
    stream = 1
    want = rewards[H:2 * H, stream].sum() / envs.optimal_return(cfg, envs.task_list(cfg)[i])
    assert np.isclose(frac[0, 1, stream], want)  # task 0 of the split, episode 2, stream 1
    assert ppo_curve.first_episode_reaching(np.array([0.1, 0.85, 0.9]), 0.8) == 2
    assert ppo_curve.first_episode_reaching(np.array([0.1, 0.2]), 0.8) is None


def test_command_prints_the_table_and_refuses_a_missing_file(tmp_path):
    path = build_history_file(make_cfg(tmp_path))
    run = lambda *a: subprocess.run([sys.executable, "scripts/ppo_curve.py", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True)
    proc = run(str(path))
    assert proc.returncode == 0 and "| 1 |" in proc.stdout and "episodes to 80% of optimal" in proc.stdout
    proc = run(str(tmp_path / "nothing.hdf5"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
