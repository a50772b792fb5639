"""scripts/key_to_door_outcomes.py: outcome shares and next-episode rates from evaluated runs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import key_to_door_outcomes as outcomes


def test_transitions_count_what_the_next_episode_reaches():
    # rollout 0 finds the key and keeps it, then the door once and loses it; rollout 1 never finds the key
    runs = np.array([[0, 1, 1, 2, 1],
                     [0, 0, 0, 0, 0]])
    key_again, door_again, key_after_none, door_after_key = outcomes.transitions(runs)
    assert key_again == "100% (3)"       # after 1, 1, 2 comes 1, 2, 1
    assert door_again == "0% (1)"        # after the 2 comes a 1
    assert key_after_none == "20% (5)"   # five episodes without the key, one followed by the key
    assert door_after_key == "50% (2)"   # after the two 1s (not the last) come 1 and 2
    assert outcomes.shares(runs, slice(0, 2)) == "75 / 25 / 0"


def test_transitions_with_a_gap_compare_episodes_that_far_apart():
    # as a model trained with episode_stride 2 sees this stream: episodes 1, 3, 5 and 2, 4
    runs = np.array([[0, 0, 1, 1, 2]])
    key_again, door_again, key_after_none, door_after_key = outcomes.transitions(runs, gap=2)
    assert key_after_none == "100% (2)"  # episode 1 -> 3 and 2 -> 4 both reach the key
    assert door_after_key == "100% (1)"  # episode 3 -> 5
    assert key_again == "100% (1)" and door_again == "-"


def fake_run(path: Path, returns: np.ndarray, optimal: float = 2.0) -> Path:
    path.mkdir()
    np.save(path / "eval_result.npy", returns)
    (path / "eval_summary.json").write_text(json.dumps({
        "per_task": [{"optimal": optimal}], "eval_split": "test", "temperature": 0.75}))
    return path


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts/key_to_door_outcomes.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_runs_of_one_variant_are_pooled(tmp_path):
    a = fake_run(tmp_path / "AD-dark_key_to_door-seed0", np.full((2, 100), 2.0))
    b = fake_run(tmp_path / "AD-dark_key_to_door-seed1", np.zeros((2, 100)))
    proc = run_script(str(a), str(b), "--no-source")
    assert proc.returncode == 0, proc.stderr
    assert "| AD (T 0.75) | 50 / 0 / 50 |" in proc.stdout
    assert "| source" not in proc.stdout


def test_runs_of_different_folders_stay_apart(tmp_path):
    (tmp_path / "long").mkdir()
    (tmp_path / "short").mkdir()
    a = fake_run(tmp_path / "long" / "AD-dark_key_to_door-seed0", np.full((2, 100), 2.0))
    b = fake_run(tmp_path / "short" / "AD-dark_key_to_door-seed0", np.zeros((2, 100)))
    proc = run_script(str(a), str(b), "--no-source")
    assert proc.returncode == 0, proc.stderr
    assert "| long/AD (T 0.75) | 0 / 0 / 100 |" in proc.stdout and "| short/AD (T 0.75) | 100 / 0 / 0 |" in proc.stdout


def test_refuses_a_run_that_is_not_key_to_door(tmp_path):
    darkroom = fake_run(tmp_path / "AD-darkroom-seed0", np.full((2, 100), 15.0), optimal=17.0)
    proc = run_script(str(darkroom), "--no-source")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not a Dark Key-to-Door evaluation" in proc.stderr


def test_source_streams_become_rows_and_one_dataset_is_required(monkeypatch, tmp_path):
    frac = np.zeros((2, 3, 2))  # (tasks, episodes, streams) fractions of optimal
    frac[1, :, 0] = [0.5, 1.0, 1.0]  # task 1, stream 0: key, then key and door twice
    monkeypatch.setattr(outcomes, "fraction_of_optimal", lambda path, split: frac)
    def config(paths):  # run "a4" was trained with episode_stride 4, the others on consecutive episodes
        name = Path(paths[0]).parent.name
        return {"data": name, "alg": "PosteriorSampling", "episode_stride": 4 if name == "a4" else 1}
    monkeypatch.setattr(outcomes, "load_config", config)
    monkeypatch.setattr(outcomes, "dataset_path", lambda cfg: Path("datasets") / cfg["data"][:1])
    name, rows, stride = outcomes.source_outcomes([tmp_path / "a1", tmp_path / "a2"], "test")
    assert name == "source PosteriorSampling"  # the row names the learner that made the data
    assert stride == 1  # runs a1 and a2 trained on consecutive episodes
    assert rows.shape == (4, 3)  # task-major: task 0 streams 0, 1, then task 1 streams 0, 1
    np.testing.assert_array_equal(rows[2], [1, 2, 2])
    assert not rows[[0, 1, 3]].any()
    with pytest.raises(outcomes.UserError, match="different datasets"):
        outcomes.source_outcomes([tmp_path / "a1", tmp_path / "b1"], "test")
    assert outcomes.source_outcomes([tmp_path / "a4"], "test")[2] == 4
    with pytest.raises(outcomes.UserError, match="different episode_stride"):
        outcomes.source_outcomes([tmp_path / "a1", tmp_path / "a4"], "test")
