"""The point robot family (env/point_robot.py): moves, rewards, the batched env against the gym
env, tasks and split, the exact optimal return, batched PPO on its Box observation, and a tiny
collect -> train -> evaluate with plain AD (state through a learned projection)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

import env as envs
from cli import load_config
from env.point_robot import PointRobotEnv, moves_to_goal
from errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DATA = [ROOT / "config/algorithm/ppo_point_robot.yaml", ROOT / "config/env/point_robot.yaml"]


def cfg_of(**overrides):
    return load_config(DATA, {"device": "cpu", "n_process": 1, **overrides})


@pytest.mark.parametrize("action,delta", [(0, (0, 0)), (1, (0, 0.1)), (2, (0, -0.1)), (3, (-0.1, 0)), (4, (0.1, 0))])
def test_moves_from_the_origin(action, delta):
    e = PointRobotEnv(goal=(1.0, 0.0))
    obs, _ = e.reset()
    assert obs.dtype == np.float32 and (obs == 0).all()
    obs, r, term, trunc, _ = e.step(action)
    np.testing.assert_allclose(obs, delta, atol=1e-7)
    assert r == 0.0 and not term and not trunc


def test_reward_only_within_the_radius_on_every_step_there_and_walls_clip():
    e = PointRobotEnv(goal=(0.0, 1.0), horizon=30, goal_radius=0.3)
    e.reset()
    rewards = [e.step(1)[1] for _ in range(20)]  # up: y = 0.1 .. 1.5 (clipped)
    # within 0.3 of (0, 1) for y in [0.7, 1.3]: steps 7..13
    assert rewards == [0.0] * 6 + [1.0] * 7 + [0.0] * 7
    assert e.pos[1] == pytest.approx(1.5)


def test_episode_truncates_at_the_horizon():
    e = PointRobotEnv(horizon=3)
    e.reset()
    assert [e.step(0)[3] for _ in range(3)] == [False, False, True]


def test_batched_env_matches_gym_for_random_actions():
    cfg = cfg_of()
    tasks = envs.task_list(cfg)[::7]
    batched = envs.make_batched_env(cfg, tasks)
    gyms = [envs.make_gym_env(cfg, t) for t in tasks]
    obs = batched.reset()
    for g, o in zip(gyms, obs):
        np.testing.assert_array_equal(g.reset()[0], o)
    rng = np.random.default_rng(0)
    for _t in range(cfg["horizon"]):
        actions = rng.integers(0, 5, len(tasks))
        obs, rewards, dones = batched.step(actions)
        for k, g in enumerate(gyms):
            g_obs, g_r, _, trunc, _ = g.step(int(actions[k]))
            np.testing.assert_array_equal(g_obs, obs[k])
            assert g_r == rewards[k] and trunc == dones[k]
    assert dones.all()


def test_tasks_are_goals_on_the_half_circle_and_split():
    cfg = cfg_of()
    goals = np.array([t["goal"] for t in envs.task_list(cfg)])
    assert goals.shape == (60, 2) and np.allclose(np.linalg.norm(goals, axis=1), 1, atol=1e-5)
    assert (goals[:, 1] >= -1e-9).all() and goals[0].tolist() == [1.0, 0.0]
    split = envs.task_split(cfg)
    assert (split.count("train"), split.count("val"), split.count("test")) == (42, 6, 12)
    space = envs.observation_space(cfg)
    assert envs.state_cardinalities(cfg) is None and space.shape == (2,)
    assert envs.model_inputs(cfg) == {"n_actions": 5, "state_dim": 2}
    state = np.array([[0.1, -0.2]], dtype=np.float32)
    np.testing.assert_array_equal(envs.state_token(cfg, state), state)


def test_moves_to_goal_by_hand():
    assert moves_to_goal([1.0, 0.0], 0.1, 0.3) == 7  # (0.7, 0): 0.3 away
    assert moves_to_goal([0.0, 0.05], 0.1, 0.2) == 0  # the start is inside
    # (cos 45, sin 45) = (0.707, 0.707): the nearest corner of the disc is 0.407 + 0.407 = 0.81 away in
    # Manhattan terms; the best lattice point within 0.3 is 10 moves away, e.g. (0.5, 0.5) (0.293 away)
    assert moves_to_goal([math.sqrt(0.5), math.sqrt(0.5)], 0.1, 0.3) == 10


def test_optimal_return_is_achieved_by_walking_there_and_never_beaten():
    cfg = cfg_of()
    for task in envs.task_list(cfg)[::5]:
        goal, opt = np.array(task["goal"]), envs.optimal_return(cfg, task)
        # greedy: move along the axis with the larger remaining gap until inside, then stay
        e = PointRobotEnv(goal=goal, horizon=cfg["horizon"], goal_radius=cfg["goal_radius"])
        e.reset()
        total, inside = 0.0, False
        for _ in range(cfg["horizon"]):
            gap = goal - e.pos
            if inside:
                a = 0
            elif abs(gap[0]) >= abs(gap[1]):
                a = 4 if gap[0] > 0 else 3
            else:
                a = 1 if gap[1] > 0 else 2
            r = e.step(a)[1]
            total, inside = total + r, inside or r > 0
        assert total <= opt and opt >= cfg["horizon"] - 11
        # the bound is tight: some path reaches it (moves_to_goal enumerates the reachable points)
        d = moves_to_goal(goal, cfg["robot_step"], cfg["goal_radius"])
        assert opt == cfg["horizon"] - d + 1
        assert total >= opt - 3  # greedy axis walking is close to the best path


def test_variants_with_one_number_per_state_token_are_refused():
    with pytest.raises(ConfigError, match="model=CompressedAD builds tokens with one number per state"):
        cfg_of(model="CompressedAD")
    with pytest.raises(ConfigError, match="use_compressed_context=true"):
        cfg_of(use_compressed_context=True, n_transit=180, compress_interval=90)


# ----------------------------------------------------------------------------- PPO and end to end

def test_batched_ppo_reads_the_box_observation_as_floats_and_learns():
    import torch

    from algorithm import batched_ppo
    cfg = cfg_of()
    enc = batched_ppo.observation_encoder(cfg, "cpu")
    obs = torch.tensor([[0.1, -0.3]])
    assert isinstance(enc, batched_ppo.BoxEncoder) and enc.dim == 2 and torch.equal(enc(obs), obs)
    # the network's first layer sees the floats: same output as the layer applied by hand
    net = batched_ppo.BatchedActorCritic(1, 2, 5, "cpu")
    net.init_task(0, torch.Generator().manual_seed(0))
    x = torch.tensor([[[0.1, -0.3], [1.0, 0.5]]])
    logits, values = net.forward(x)
    P = net.task_view(0)
    h = torch.tanh(x[0] @ P["mlp_extractor.policy_net.0.weight"].T + P["mlp_extractor.policy_net.0.bias"])
    h = torch.tanh(h @ P["mlp_extractor.policy_net.2.weight"].T + P["mlp_extractor.policy_net.2.bias"])
    np.testing.assert_allclose(logits[0].T, h @ P["action_net.weight"].T + P["action_net.bias"], atol=1e-5)
    # learns a goal next to the start (optimal 30 - 7 + 1 = 24)
    small = cfg_of(n_stream=8, total_source_timesteps=8 * 90 * 12, batch_size=90)
    out = {}
    batched_ppo.collect(small, [0], envs.task_list(small), out.update)
    returns = out[0]["rewards"].reshape(-1, small["horizon"], small["n_stream"]).sum(1).mean(1)
    assert out[0]["states"].dtype == np.float32 and returns[-3:].mean() > returns[:3].mean() + 5


TINY = ["robot_goals=10", "train_env_ratio=0.6", "val_env_ratio=0.2", "n_stream=4", "total_source_timesteps=720",
        "n_steps=90", "batch_size=90", "n_epochs=1", "test_stream_ratio=0.25", "n_transit=30", "tf_n_embd=16",
        "tf_n_layer=1", "train_timesteps=6", "eval_interval=0", "test_interval=100", "eval_episodes=3",
        "eval_rollouts=2", "device=cpu", "n_process=1"]


def test_tiny_collect_train_evaluate(tmp_path, monkeypatch, capsys):
    from cli_in_process import collect_train_evaluate
    run = tmp_path / "runs" / "AD-point_robot-seed0"
    collect_train_evaluate(monkeypatch, capsys, DATA, ROOT / "config/model/ad_point_robot.yaml",
                           [*TINY, f"dataset_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'runs'}"], run)
    summary = json.loads((run / "eval_summary.json").read_text())
    assert summary["n_episodes"] == 3 and set(summary["split"]) == {"test"} and summary["max_context_tokens"] == 30
    assert all(o > 0 for o in summary["optimal_return"])
