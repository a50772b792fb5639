"""alg: PosteriorSampling (algorithm/posterior_sampling.py): a learner that searches the
grid for the hidden cells. It never rules the true cell out, it only gets better from one
episode to the next, it learns from its own stream alone, a task's history does not depend
on its chunk, and a family without hidden cells is refused before any work."""
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_in_process import run_in_process

import collect
import env as envs
from algorithm import policy_loop, posterior_sampling, registry
from algorithm.history import read_header, read_task
from cli import load_config
from config.loading import parse_set

ROOT = Path(__file__).resolve().parents[1]
K2D = ["config/algorithm/posterior_sampling_dark_key_to_door.yaml", "config/env/dark_key_to_door_9x9_all.yaml"]
DARKROOM = ["config/algorithm/ppo_darkroom.yaml", "config/env/darkroom.yaml"]


def config(files, sets=()):
    return load_config([ROOT / f for f in files], parse_set(list(sets)))


def episode_returns(cfg, history) -> np.ndarray:
    """(episodes, streams) returns of one task's history."""
    rewards = history["rewards"]
    return rewards.reshape(-1, cfg["horizon"], rewards.shape[1]).sum(1)


@pytest.mark.parametrize("files, horizon", [(K2D, 25), (DARKROOM, 20)])
def test_every_stream_improves_monotonically_to_the_optimal_return(files, horizon):
    # 5x5, every task, 2 streams x 10 episodes: once a cell is found it is never lost, and
    # no episode does worse than the one before it
    cfg = config(files, ["alg=PosteriorSampling", "grid_size=5", f"horizon={horizon}", "n_stream=2",
                         f"n_steps={2 * horizon}", f"total_source_timesteps={2 * 10 * horizon}"])
    tasks = envs.task_list(cfg)
    histories = policy_loop.run_chunk(cfg, list(range(len(tasks))), tasks, posterior_sampling.PosteriorSampler)
    returns = np.stack([episode_returns(cfg, histories[i]) for i in range(len(tasks))])  # (task, ep, stream)
    optimal = np.array([envs.optimal_return(cfg, t) for t in tasks])[:, None, None]
    assert (np.diff(returns, axis=1) >= 0).all()
    assert (returns[:, -1] == optimal[:, 0]).all()           # every stream ends optimal
    assert (returns[:, 0] < optimal[:, 0]).mean() > 0.4        # and most had to search for it first


def test_the_streams_of_a_task_search_independently_and_a_history_does_not_depend_on_its_chunk():
    cfg = config(K2D, ["grid_size=5", "horizon=25", "n_stream=4", "n_steps=50", "total_source_timesteps=800"])
    tasks = envs.task_list(cfg)
    together = policy_loop.run_chunk(cfg, [3, 7, 9], tasks, posterior_sampling.PosteriorSampler)
    alone = policy_loop.run_chunk(cfg, [7], tasks, posterior_sampling.PosteriorSampler)
    for k in alone[7]:
        np.testing.assert_array_equal(together[7][k], alone[7][k])
    first_episode = together[7]["actions"][:25]
    assert len({tuple(first_episode[:, s]) for s in range(4)}) > 1


def test_collect_writes_posterior_sampling_histories(tmp_path, monkeypatch, capsys):
    sets = ["grid_size=3", "horizon=25", "n_stream=2", "n_steps=50", "total_source_timesteps=200",
            f"dataset_dir={tmp_path}"]
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main, [*(ROOT / f for f in K2D), "--set", *sets])
    assert code == 0, err
    path = tmp_path / "history_dark_key_to_door_PosteriorSampling_alg-seed42.hdf5"
    assert sorted(read_header(path)["done"]) == list(range(81))
    with h5py.File(path, "r") as f:
        h = read_task(f, 0)
        assert f["0"].attrs["backend"] == "posterior_sampling"
    assert h["actions"].shape == (100, 2) and set(np.unique(h["compress_markers"])) == {0, 1, 2}


def test_a_family_without_hidden_cells_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    files = [ROOT / "config/algorithm/ppo_bandit.yaml", ROOT / "config/env/bandit.yaml"]
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main,
                               [*files, "--set", "alg=PosteriorSampling", f"dataset_dir={tmp_path}"])
    assert code == 2 and "alg=PosteriorSampling searches grid cells" in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_progress_of_a_policy_source_moves_every_episode():
    """A chunk of hundreds of tasks takes minutes: the bar moves per episode, not per chunk."""
    cfg = config(K2D, ["grid_size=5", "horizon=25", "n_stream=2", "n_steps=50", "total_source_timesteps=200"])
    tasks = envs.task_list(cfg)
    calls = []
    registry.collect(cfg, list(range(6)), tasks, lambda results: None,
                     lambda n_tasks, n_steps: calls.append((n_tasks, n_steps)))
    steps = [s for _, s in calls if s]
    assert len(steps) == 4  # 100 steps per stream: one call per 25-step episode
    assert sum(steps) == 6 * 2 * 100 and sum(n for n, _ in calls) == 6
