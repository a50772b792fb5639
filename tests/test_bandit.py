"""The bandit family (env/bandit.py) and its regret baselines (scripts/bandit_baselines.py):
rewards, seeding, the task list and split, optimal return, UCB1 / Thompson on cases with a
known answer, batched PPO learning a bandit, and a tiny collect -> train -> evaluate -> regret."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import env as envs
from cli import load_config
from env.bandit import BanditEnv, BatchedBandit, draw_tasks
from errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bandit_baselines as bb

DATA = [ROOT / "config/algorithm/ppo_bandit.yaml", ROOT / "config/env/bandit.yaml"]


def cfg_of(**overrides):
    return load_config(DATA, {"device": "cpu", "n_process": 1, **overrides})


def test_task_list_is_fixed_seeded_and_every_best_arm_has_the_gap():
    cfg = cfg_of()
    tasks = envs.task_list(cfg)
    assert len(tasks) == 500 and tasks == envs.task_list(cfg_of(env_split_seed=3))  # not the split's seed
    means = np.array([t["means"] for t in tasks])
    assert means.shape == (500, 5) and (means >= 0).all() and (means <= 1).all()
    top2 = np.sort(means, 1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] >= 0.1 - 1e-9).all()
    assert draw_tasks(10, 5, 0.1) == [t["means"] for t in tasks[:10]]  # a prefix of the longer list
    assert len(envs.task_list(cfg_of(n_arms=3))[0]["means"]) == 3


def test_split_sizes_optimal_return_and_spaces():
    cfg = cfg_of()
    split = envs.task_split(cfg)
    assert (split.count("train"), split.count("val"), split.count("test")) == (400, 50, 50)
    task = {"means": [0.2, 0.9, 0.5]}
    assert envs.optimal_return(cfg, task) == 0.9
    assert envs.n_actions(cfg_of(n_arms=7)) == 7
    assert envs.state_cardinalities(cfg) == [1] and envs.state_dim(cfg) == 1
    assert envs.model_inputs(cfg) == {"n_actions": 5, "state_cardinalities": [1]}


def test_the_family_keys_define_bandit_data_only():
    from config.loading import collection_config
    bandit = collection_config(cfg_of())
    darkroom = collection_config(load_config([ROOT / "config/env/darkroom.yaml"], {"n_arms": 9}))
    assert {"n_arms", "bandit_tasks", "bandit_min_gap"} <= set(bandit) and "robot_goals" not in bandit
    assert "n_arms" not in darkroom  # another family's data and runs never compare it


def test_horizon_other_than_one_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="horizon=1"):
        cfg_of(horizon=2)


def test_rewards_are_bernoulli_with_the_arm_means():
    e = BatchedBandit([[0.0, 1.0, 0.3]] * 4000, seed=0)
    assert (e.reset() == 0).all()
    _, r0, done = e.step(np.zeros(4000, dtype=int))
    assert (r0 == 0).all() and done.all() and r0.dtype == np.float32
    e.reset()
    assert (e.step(np.ones(4000, dtype=int))[1] == 1).all()
    e.reset()
    assert abs(e.step(np.full(4000, 2))[1].mean() - 0.3) < 0.03


def test_copies_draw_from_their_own_seeded_streams():
    """A copy's rewards depend on the seed, its task and its occurrence, not on the other copies."""
    a, b = [0.5] * 3, [0.4, 0.6, 0.5]

    def draws(means_list, seed, steps=50):
        e = BatchedBandit(means_list, seed=seed)
        out = []
        for _ in range(steps):
            e.reset()
            out.append(e.step(np.full(len(means_list), 2))[1])
        return np.array(out).T

    alone, mixed = draws([a, a], 0), draws([b, a, b, a], 0)
    np.testing.assert_array_equal(alone, mixed[[1, 3]])
    assert not np.array_equal(alone[0], alone[1])  # two copies of one task: two streams
    assert not np.array_equal(alone, draws([a, a], 1))  # another seed
    # env.make_batched_env seeds it
    cfg = cfg_of()
    e = envs.make_batched_env(cfg, [{"means": a}, {"means": a}], seed=0)
    e.reset()
    np.testing.assert_array_equal(e.step(np.full(2, 2))[1], alone[:, 0])


def test_batched_env_matches_the_gym_env_with_the_same_draws():
    cfg = cfg_of()
    task = envs.task_list(cfg)[3]
    batched = envs.make_batched_env(cfg, [task], seed=5)
    gym_env = envs.make_gym_env(cfg, task)
    gym_env.reset(seed=0)
    gym_env.unwrapped.np_random = np.random.default_rng()
    gym_env.unwrapped.np_random.bit_generator.state = batched.generators[0].bit_generator.state
    rng = np.random.default_rng(0)
    for _ in range(100):
        a = int(rng.integers(5))
        batched.reset()
        gym_env.reset()
        obs, r, done = batched.step(np.array([a]))
        g_obs, g_r, term, trunc, _ = gym_env.step(a)
        assert r[0] == g_r and done[0] and trunc and not term and (obs[0] == g_obs).all()
    assert isinstance(gym_env.unwrapped, BanditEnv)


# ----------------------------------------------------------------------------- baselines

def test_baselines_on_arms_with_known_answers():
    # every arm pays always: no policy has regret
    for rewards in (bb.ucb1(BatchedBandit([[1.0] * 4] * 20, seed=0), 4, 30),
                    bb.thompson(BatchedBandit([[1.0] * 4] * 20, seed=0), 4, 30, 0)):
        assert rewards.shape == (20, 30) and (bb.cumulative_regret(rewards, np.ones(20)) == 0).all()
    # deterministic arms (0 or 1): UCB1 pulls each arm once first, so after k pulls the regret is k - 1
    k = 5
    det = [[1.0 if a == b else 0.0 for a in range(k)] for b in range(k)]
    r = bb.ucb1(BatchedBandit(det, seed=0), k, k)
    np.testing.assert_array_equal(bb.cumulative_regret(r, np.ones(k))[:, -1], np.full(k, k - 1.0))
    # then it exploits: the best arm on most of 200 pulls; the others only log(t)-often
    r = bb.ucb1(BatchedBandit(det, seed=0), k, 200)
    regret = bb.cumulative_regret(r, np.ones(k))[:, -1]
    assert (regret >= k - 1).all() and (regret <= 4 * 8 * np.log(200) / 1.0).all() and r[:, -20:].mean() > 0.9
    # Thompson on a deterministic 2-arm bandit: a failure of the bad arm makes it nearly never pulled again
    r = bb.thompson(BatchedBandit([[0.0, 1.0]] * 200, seed=0), 2, 100, seed=0)
    regret = bb.cumulative_regret(r, np.ones(200))[:, -1]
    assert regret.mean() < 3 and r[:, -50:].mean() > 0.99


def test_baselines_beat_random_and_regret_grows_slower_than_linearly():
    tasks = draw_tasks(100, 5, 0.1)
    best = np.array([max(m) for m in tasks])
    random_regret = (best - np.array([np.mean(m) for m in tasks])).mean() * 300
    for name in ("UCB1", "Thompson"):
        env = BatchedBandit(tasks, seed=0)
        r = bb.ucb1(env, 5, 300) if name == "UCB1" else bb.thompson(env, 5, 300, 0)
        regret = bb.cumulative_regret(r, best).mean(0)
        assert regret[-1] < 0.5 * random_regret, name
        assert regret[299] - regret[149] < regret[149] - regret[0], name  # the second half costs less


def test_bootstrap_interval_holds_the_mean():
    values = np.random.default_rng(0).normal(3.0, 1.0, 200)
    lo, hi = bb.bootstrap_ci(values)
    assert lo < values.mean() < hi and hi - lo < 0.5


# ----------------------------------------------------------------------------- PPO and end to end

def test_batched_ppo_learns_a_bandit_within_the_stream():
    from algorithm import batched_ppo
    cfg = cfg_of(bandit_tasks=20, total_source_timesteps=4 * 100)
    out = {}
    batched_ppo.collect(cfg, [0, 1, 2, 3], envs.task_list(cfg), out.update)
    tasks = envs.task_list(cfg)
    frac = np.mean([out[i]["rewards"][-30:].mean() / max(tasks[i]["means"]) for i in out])
    first = np.mean([out[i]["rewards"][:10].mean() / max(tasks[i]["means"]) for i in out])
    assert frac > 0.85 and frac > first + 0.1
    assert (out[0]["states"] == 0).all() and out[0]["dones"].all()


TINY = ["bandit_tasks=20", "train_env_ratio=0.6", "val_env_ratio=0.2", "total_source_timesteps=160",
        "n_transit=8", "tf_n_embd=16", "tf_n_layer=1", "train_timesteps=6", "eval_interval=0",
        "test_interval=100", "eval_episodes=12", "eval_rollouts=2", "device=cpu", "n_process=1"]


def test_tiny_collect_train_evaluate_and_regret_table(tmp_path, monkeypatch, capsys):
    from cli_in_process import collect_train_evaluate
    run = tmp_path / "runs" / "AD-bandit-seed0"
    collect_train_evaluate(monkeypatch, capsys, DATA, ROOT / "config/model/ad_bandit.yaml",
                           [*TINY, f"dataset_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'runs'}"], run)
    summary = json.loads((run / "eval_summary.json").read_text())
    assert summary["n_episodes"] == 12 and set(summary["split"]) == {"test"}
    text, rows = bb.compare([run], ["AD"], checkpoints=[5, 12])
    labels = [r["label"] for r in rows]
    assert labels[:3] == ["AD", "UCB1", "Thompson"] and labels[3].startswith("source PPO")
    assert labels[4] == "uniform random"
    assert "regret @12" in text and all(r["rows"] > 0 for r in rows)


def test_the_source_row_says_how_the_streams_were_trained():
    assert bb.describe_learners({"n_stream": 4}) == "4 streams share one learner"
    assert bb.describe_learners({"n_stream": 4, "learners_per_task": 4}) == "4 streams, one learner each"
    assert bb.describe_learners({"n_stream": 4, "learners_per_task": 2}) == "4 streams, 2 learners of 2"
