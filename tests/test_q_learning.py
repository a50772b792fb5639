"""alg: QLearning (algorithm/q_learning.py): tabular Q-learning with optimistic values, one
learner per stream. On every task of a 5x5 Dark Key-to-Door each stream finds the optimal
return by itself within 20 episodes; the backward replay of each episode is what makes it
fast; a task's history does not depend on its chunk; a family that is no grid is refused
before any work."""
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_in_process import run_in_process

import collect
import env as envs
from algorithm import policy_loop, q_learning
from algorithm.history import read_header, read_task
from cli import load_config
from config.loading import parse_set
from errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
K2D = ["config/algorithm/q_learning_dark_key_to_door.yaml", "config/env/dark_key_to_door_9x9_all.yaml"]


def config(sets=()):
    return load_config([ROOT / f for f in K2D], parse_set(list(sets)))


def fractions(episodes: int, sets=()) -> np.ndarray:
    """(task, episode, stream) return / optimal return on every task of a 5x5 Dark Key-to-Door, 2 streams."""
    cfg = config(["grid_size=5", "horizon=25", "n_stream=2", "n_steps=50",
                  f"total_source_timesteps={2 * episodes * 25}", *sets])
    tasks = envs.task_list(cfg)
    histories = policy_loop.run_chunk(cfg, list(range(len(tasks))), tasks, q_learning.QLearner)
    returns = np.stack([histories[i]["rewards"].reshape(-1, 25, 2).sum(1) for i in range(len(tasks))])
    return returns / np.array([envs.optimal_return(cfg, t) for t in tasks])[:, None, None]


def test_every_stream_learns_the_optimal_return_by_itself():
    frac = fractions(30)
    first_optimal = (frac == 1).argmax(1)
    assert (frac == 1).any(1).all() and first_optimal.max() < 20    # every stream, every task, within 20 episodes
    assert (frac[:, -1] == 1).mean() > 0.99                          # and stays there
    assert frac[:, 0].mean() < 0.5                                   # after starting out knowing nothing


def test_the_episode_replay_speeds_learning_up():
    with_replay, without = fractions(8).mean((0, 2)), fractions(8, ["q_replay=false"]).mean((0, 2))
    assert with_replay[-1] > without[-1] + 0.1


def test_the_streams_of_a_task_learn_independently_and_a_history_does_not_depend_on_its_chunk():
    cfg = config(["grid_size=5", "horizon=25", "n_stream=4", "n_steps=50", "total_source_timesteps=800",
                  "q_epsilon=0.1"])
    tasks = envs.task_list(cfg)
    together = policy_loop.run_chunk(cfg, [3, 7, 9], tasks, q_learning.QLearner)
    alone = policy_loop.run_chunk(cfg, [7], tasks, q_learning.QLearner)
    for k in alone[7]:
        np.testing.assert_array_equal(together[7][k], alone[7][k])
    first_episode = together[7]["actions"][:25]
    assert len({tuple(first_episode[:, s]) for s in range(4)}) > 1


def test_collect_writes_q_learning_histories_and_its_keys_name_the_data(tmp_path, monkeypatch, capsys):
    sets = ["grid_size=3", "horizon=25", "n_stream=2", "n_steps=50", "total_source_timesteps=200",
            f"dataset_dir={tmp_path}"]
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main, [*(ROOT / f for f in K2D), "--set", *sets])
    assert code == 0, err
    path = tmp_path / "history_dark_key_to_door_QLearning_alg-seed42.hdf5"
    assert sorted(read_header(path)["done"]) == list(range(81))
    with h5py.File(path, "r") as f:
        h = read_task(f, 0)
        assert f["0"].attrs["backend"] == "q_learning"
    assert h["actions"].shape == (100, 2)
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main,
                               [*(ROOT / f for f in K2D), "--set", *sets, "q_gamma=0.9"])
    assert code != 0 and "q_gamma" in err, err   # other values of its keys are other data


def test_a_family_that_is_no_grid_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    files = [ROOT / "config/algorithm/ppo_bandit.yaml", ROOT / "config/env/bandit.yaml"]
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main,
                               [*files, "--set", "alg=QLearning", f"dataset_dir={tmp_path}"])
    assert code == 2 and "alg=QLearning keeps a table over grid cells" in err, err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError):
        q_learning.QLearner.check(load_config(files, parse_set(["alg=QLearning"])))
