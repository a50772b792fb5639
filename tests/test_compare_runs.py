"""scripts/compare_runs.py and report.paired_difference: run-by-run differences of two
folders of evaluated runs, on made-up evaluation outputs with known scores."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import compare_runs

import report
from errors import UserError

N_TASKS, N_ROLLOUTS = 20, 2


def fake_run(folder: Path, name: str, final: np.ndarray, tasks=None, temperature=1.0):
    """A run directory with an evaluation whose last-episode returns are `final` (tasks x rollouts), optimum 2."""
    run = folder / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: AD\n")
    tasks = tasks if tasks is not None else list(range(N_TASKS))
    summary = {"tasks": tasks, "n_rollouts": N_ROLLOUTS, "per_task": [{"optimal": 2.0} for _ in tasks],
               "n_episodes": 3, "eval_split": "test", "temperature": temperature, "greedy": False, "seed": 0,
               "memory": "keep"}
    (run / "eval_summary.json").write_text(json.dumps(summary))
    returns = np.zeros((len(tasks) * N_ROLLOUTS, 3))
    returns[:, -1] = final.reshape(-1)  # task-major rows, as evaluate.py writes them
    np.save(run / "eval_result.npy", returns)


def test_paired_difference_is_new_minus_base_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    base = [rng.uniform(0, 1, (2, N_TASKS)) for _ in range(3)]
    new = [b + 0.1 + rng.normal(0, 0.05, b.shape) for b in base]
    per_pair, mean, low, high = report.paired_difference(base, new)
    assert per_pair == pytest.approx([n.mean() - b.mean() for b, n in zip(base, new)])
    assert mean == pytest.approx(np.mean(per_pair)) and low < mean < high
    assert low > 0.05 and high < 0.15
    same = report.paired_difference(base, base)
    assert same[1:] == (0.0, 0.0, 0.0)


def test_compare_pairs_runs_by_name_and_reports_each(tmp_path):
    base, new = tmp_path / "base", tmp_path / "new"
    for seed, (b, n) in enumerate([(0.5, 1.0), (1.0, 1.4)]):  # returns of 2: 25% -> 50%, 50% -> 70%
        fake_run(base, f"AD-x-seed{seed}", np.full((N_TASKS, N_ROLLOUTS), b))
        fake_run(new, f"AD-x-seed{seed}", np.full((N_TASKS, N_ROLLOUTS), n))
    fake_run(new, "AD-x-seed9", np.zeros((N_TASKS, N_ROLLOUTS)))  # only in one folder: not paired
    for folder in (base, new):  # another variant whose name starts like AD's
        fake_run(folder, "AD-tworegion-x-seed0", np.zeros((N_TASKS, N_ROLLOUTS)))
    assert "AD-tworegion" not in compare_runs.compare(base, new, variant="AD")
    out = compare_runs.compare(base, new, variant="AD")
    assert "AD-x-seed0: 25.0% -> 50.0% (+25.0)" in out and "AD-x-seed1: 50.0% -> 70.0% (+20.0)" in out
    assert "seed9" not in out
    assert "mean difference +22.5 points over 2 pair(s), 95% bootstrap over 20 tasks [+22.5, +22.5]" in out


def test_compare_refuses_runs_on_other_tasks_and_folders_without_pairs(tmp_path):
    base, new = tmp_path / "base", tmp_path / "new"
    fake_run(base, "AD-x-seed0", np.ones((N_TASKS, N_ROLLOUTS)))
    fake_run(new, "AD-x-seed0", np.ones((N_TASKS, N_ROLLOUTS)), tasks=list(range(100, 100 + N_TASKS)))
    with pytest.raises(UserError, match=r"evaluated differently \(tasks\)"):
        compare_runs.compare(base, new)
    fake_run(tmp_path / "b", "AD-x-seed1", np.ones((N_TASKS, N_ROLLOUTS)))
    fake_run(tmp_path / "n", "AD-x-seed1", np.ones((N_TASKS, N_ROLLOUTS)), temperature=0.75)
    with pytest.raises(UserError, match="temperature 1.0 vs 0.75"):
        compare_runs.compare(tmp_path / "b", tmp_path / "n")
    with pytest.raises(UserError, match="no runs of the same name of CompressedAD"):
        compare_runs.compare(base, new, variant="CompressedAD")
    proc = subprocess.run([sys.executable, "scripts/compare_runs.py", str(base), str(tmp_path / "nothing")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
