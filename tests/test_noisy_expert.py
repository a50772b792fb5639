"""alg: NoisyExpert (algorithm/noisy_expert.py): the experts are optimal, epsilon falls as
documented, a task's history does not depend on its chunk, and a family without an expert
is refused before any work."""
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_in_process import run_in_process

import collect
import env as envs
from algorithm import noisy_expert, policy_loop
from algorithm.history import read_header, read_task
from cli import load_config
from config.loading import parse_set

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import source_curve

K2D = ["config/algorithm/noisy_expert_dark_key_to_door.yaml", "config/env/dark_key_to_door_9x9_all.yaml"]


def config(files, sets=()):
    return load_config([ROOT / f for f in files], parse_set(list(sets)))


@pytest.mark.parametrize("files", [K2D, ["config/algorithm/ppo_darkroom.yaml", "config/env/darkroom.yaml"]])
def test_the_expert_earns_the_optimal_return_on_every_task(files):
    cfg = config(files, ["grid_size=5"])
    tasks = envs.task_list(cfg)
    batched, expert = envs.make_batched_env(cfg, tasks), envs.expert(cfg, tasks)
    states, total, done = batched.reset(), np.zeros(len(tasks)), False
    while not done:
        states, rewards, dones = batched.step(expert(states))
        total, done = total + rewards, dones.all()
    optimal = np.array([envs.optimal_return(cfg, t) for t in tasks])
    np.testing.assert_array_equal(total, optimal)


def tiny(sets=()):
    # 5x5 key-to-door (25-step episodes), 4 streams x 8 episodes, regions of 2 episodes
    return config(K2D, ["grid_size=5", "horizon=25", "n_stream=4", "n_steps=50", "batch_size=50",
                        "total_source_timesteps=800", "noise_decay_episodes=4", *sets])


def test_epsilon_falls_linearly_to_zero_and_then_the_expert_alone_acts():
    cfg = tiny()
    assert [noisy_expert.epsilon(cfg, e) for e in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    tasks = envs.task_list(cfg)
    chunk = list(range(12))
    histories = policy_loop.run_chunk(cfg, chunk, tasks, noisy_expert.NoisyExpert)
    agree = []
    for index in chunk:
        h = histories[index]
        expert = envs.expert(cfg, [tasks[index]] * cfg["n_stream"])
        # (T, S, 3) -> per step, the expert's action for each stream's state
        wanted = np.stack([expert(s.astype(np.int64)) for s in h["states"]])
        agree.append((h["actions"] == wanted).reshape(8, 25, 4).mean(axis=(1, 2)))
    agree = np.mean(agree, axis=0)
    assert (agree[4:] == 1.0).all(), agree       # epsilon 0: the expert's every action
    assert 0.1 < agree[0] < 0.45, agree           # epsilon 1: uniform over 5 actions (some equal the expert's)
    assert agree[0] < agree[2] < agree[4], agree  # and in between, more and more


def test_a_tasks_history_does_not_depend_on_its_chunk():
    cfg = tiny()
    tasks = envs.task_list(cfg)
    together = policy_loop.run_chunk(cfg, [3, 7, 9], tasks, noisy_expert.NoisyExpert)
    alone = policy_loop.run_chunk(cfg, [7], tasks, noisy_expert.NoisyExpert)
    for k in alone[7]:
        np.testing.assert_array_equal(together[7][k], alone[7][k])
    assert not np.array_equal(together[3]["actions"], together[9]["actions"])


def test_collect_writes_noisy_expert_histories(tmp_path, monkeypatch, capsys):
    sets = ["grid_size=3", "horizon=25", "n_stream=2", "n_steps=50", "batch_size=50",
            "total_source_timesteps=200", "noise_decay_episodes=2", f"dataset_dir={tmp_path}"]
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main, [*(ROOT / f for f in K2D), "--set", *sets])
    assert code == 0, err
    path = tmp_path / "history_dark_key_to_door_NoisyExpert_alg-seed42.hdf5"
    header = read_header(path)
    assert sorted(header["done"]) == list(range(81))
    with h5py.File(path, "r") as f:
        h = read_task(f, 0)
        assert f["0"].attrs["backend"] == "noisy_expert"
    assert h["actions"].shape == (100, 2) and set(np.unique(h["compress_markers"])) == {0, 1, 2}
    # the source-curve script does not speak of learners where there were none
    source_curve.print_first_rewards(path, "all")
    assert "independent streams (alg NoisyExpert)" in capsys.readouterr().out


def test_a_family_without_an_expert_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    files = [ROOT / "config/algorithm/ppo_bandit.yaml", ROOT / "config/env/bandit.yaml"]
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main,
                               [*files, "--set", "alg=NoisyExpert", f"dataset_dir={tmp_path}"])
    assert code == 2 and "alg=NoisyExpert needs an expert policy" in err, err
    assert list(tmp_path.iterdir()) == []
