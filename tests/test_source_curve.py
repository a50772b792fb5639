"""scripts/source_curve.py: the source learner's curve read back from a history file."""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
from fixtures_history import build_history_file, make_cfg

import env as envs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import source_curve


def test_fraction_of_optimal_is_each_episodes_return_over_the_tasks_optimum(tmp_path):
    cfg = make_cfg(tmp_path)
    path = build_history_file(cfg)
    split = envs.task_split(cfg)
    frac = source_curve.fraction_of_optimal(path, "test")
    test_tasks = [i for i, s in enumerate(split) if s == "test"]
    assert frac.shape[0] == len(test_tasks)
    i, H = test_tasks[0], cfg["horizon"]
    with h5py.File(path, "r") as f:
        rewards = f[str(i)]["rewards"][()]
    stream = 1
    want = rewards[H:2 * H, stream].sum() / envs.optimal_return(cfg, envs.task_list(cfg)[i])
    assert np.isclose(frac[0, 1, stream], want)  # task 0 of the split, episode 2, stream 1
    assert source_curve.first_episode_reaching(np.array([0.1, 0.85, 0.9]), 0.8) == 2
    assert source_curve.first_episode_reaching(np.array([0.1, 0.2]), 0.8) is None


def test_command_prints_the_table_and_refuses_a_missing_file(tmp_path):
    path = build_history_file(make_cfg(tmp_path))
    run = lambda *a: subprocess.run([sys.executable, "scripts/source_curve.py", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True)
    proc = run(str(path))
    assert proc.returncode == 0 and "| 1 |" in proc.stdout and "episodes to 80% of optimal" in proc.stdout
    assert "first reward of a stream:" in proc.stdout and "stream(s) per learner" in proc.stdout
    proc = run(str(tmp_path / "nothing.hdf5"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_stream_is_led_when_its_learner_was_updated_on_another_streams_first_reward():
    # rollouts of 10 steps: an update follows steps 9, 19, 29, ...
    first = np.array([3, 25, 12, 8])  # stream 0 first at step 3 (rollout 0), update at step 10
    # one learner for all four: streams 1 (25) and 2 (12) came after that update; stream 3
    # (8) came before it, inside the same rollout: not led; stream 0 was the first
    np.testing.assert_array_equal(source_curve.led_by_another_stream(first, 10, 1, 40), [False, True, True, False])
    # two learners of two streams: stream 1 is led by stream 0; stream 2 (12) by stream 3 (8,
    # update at 10); stream 3 came first in its learner
    np.testing.assert_array_equal(source_curve.led_by_another_stream(first, 10, 2, 40), [False, True, True, False])
    # a learner per stream: nobody else's reward can reach a stream's policy
    assert not source_curve.led_by_another_stream(first, 10, 4, 40).any()
    # a stream that never got a reward (its first is the stream's length) was not led to one
    assert source_curve.led_by_another_stream(np.array([5, 40]), 10, 1, 40).tolist() == [False, False]


def test_first_reward_steps_read_each_streams_first_nonzero_reward(tmp_path):
    cfg = make_cfg(tmp_path)
    path = build_history_file(cfg)
    firsts, collection = source_curve.first_reward_steps(path, "all")
    with h5py.File(path, "r") as f:
        rewards = f["0"]["rewards"][()]
    for s in range(rewards.shape[1]):
        hits = np.flatnonzero(rewards[:, s])
        assert firsts[0][s] == (hits[0] if len(hits) else rewards.shape[0])
    assert collection["n_stream"] == cfg["n_stream"]


def test_kept_after_first_optimal_is_the_share_of_optimal_episodes_right_after_the_first():
    # one task, two streams, 7 episodes (fractions of optimal)
    frac = np.array([[[0.0, 0.0], [1.0, 0.5], [1.0, 1.0], [0.5, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    # stream 0: first optimal at episode 1, next four 1, .5, 1, 1 -> 3/4; stream 1: first at
    # episode 2, next four 0, 0, 0, 1 -> 1/4
    share, counted = source_curve.kept_after_first_optimal(frac)
    assert counted == 2 and share == (0.75 + 0.25) / 2
    # a stream whose first optimal episode has fewer than 4 episodes behind it is not counted
    assert source_curve.kept_after_first_optimal(frac[:, :6]) == (0.75, 1)
    share, counted = source_curve.kept_after_first_optimal(np.zeros((1, 5, 2)))
    assert counted == 0 and np.isnan(share)
