"""Darkroom and Dark Key-to-Door: dynamics, rewards, horizons, task lists, splits, optimal
returns, and agreement between the gymnasium envs and the batched numpy envs."""
import json

import gymnasium as gym
import numpy as np
import pytest

import env as envs
from env.dark_key_to_door import BatchedDarkKeyToDoor, DarkKeyToDoorEnv
from env.darkroom import BatchedDarkroom, DarkroomEnv

STAY, UP, DOWN, LEFT, RIGHT = range(5)
# independent copy of the documented action meaning: 0 stay, 1 y+1, 2 y-1, 3 x-1, 4 x+1
DELTA = {STAY: (0, 0), UP: (0, 1), DOWN: (0, -1), LEFT: (-1, 0), RIGHT: (1, 0)}


def dr_cfg(**kw):
    cfg = {"env": "darkroom", "grid_size": 9, "horizon": 20, "env_split_seed": 0, "train_env_ratio": 0.9,
           "val_env_ratio": 0.1}
    cfg.update(kw)
    return cfg


def kd_cfg(**kw):
    cfg = {"env": "dark_key_to_door", "grid_size": 9, "horizon": 50, "env_split_seed": 0,
           "train_env_ratio": 0.9, "val_env_ratio": 0.1}
    cfg.update(kw)
    return cfg


def manhattan(a, b):
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


# ----------------------------------------------------------------------------- darkroom dynamics

@pytest.mark.parametrize("action", range(5))
def test_darkroom_moves_from_centre(action):
    e = DarkroomEnv(goal=(0, 0))
    obs, _ = e.reset()
    assert obs.tolist() == [4, 4]
    obs, r, term, trunc, _ = e.step(action)
    dx, dy = DELTA[action]
    assert obs.tolist() == [4 + dx, 4 + dy]
    assert r == 0.0 and not term and not trunc


@pytest.mark.parametrize("corner,blocked", [((0, 0), (LEFT, DOWN)), ((8, 8), (RIGHT, UP)),
                                            ((0, 8), (LEFT, UP)), ((8, 0), (RIGHT, DOWN))])
def test_darkroom_walls_keep_agent_in_place(corner, blocked):
    e = DarkroomEnv(goal=(4, 4))
    e.reset()
    # walk into the corner, then keep pushing into both walls
    for _ in range(10):
        e.step(LEFT if corner[0] == 0 else RIGHT)
        e.step(DOWN if corner[1] == 0 else UP)
    assert e.pos.tolist() == list(corner)
    for a in blocked:
        obs, *_ = e.step(a)
        assert obs.tolist() == list(corner)
    obs, *_ = e.step(STAY)
    assert obs.tolist() == list(corner)


def test_darkroom_obs_is_a_copy():
    e = DarkroomEnv(goal=(0, 0))
    obs, _ = e.reset()
    obs2, *_ = e.step(UP)
    assert obs.tolist() == [4, 4] and obs2.tolist() == [4, 5]
    obs2[0] = 99
    assert e.pos.tolist() == [4, 5]


def test_darkroom_reward_on_every_step_on_goal():
    # goal one step up: reward from the step that enters it, on every step spent there,
    # nothing after leaving
    e = DarkroomEnv(goal=(4, 5))
    e.reset()
    rewards = [e.step(a)[1] for a in [STAY, UP, STAY, STAY, LEFT, RIGHT, STAY, DOWN, STAY]]
    assert rewards == [0, 1, 1, 1, 0, 1, 1, 0, 0]


def test_darkroom_goal_at_start_rewards_staying_every_step():
    e = DarkroomEnv(goal=(4, 4))
    e.reset()
    rewards = [e.step(STAY)[1] for _ in range(20)]
    assert rewards == [1.0] * 20


@pytest.mark.parametrize("horizon", [1, 7, 20])
def test_darkroom_truncates_at_horizon(horizon):
    e = DarkroomEnv(goal=(0, 0), horizon=horizon)
    e.reset()
    flags = []
    for _ in range(horizon):
        _, _, term, trunc, _ = e.step(RIGHT)
        flags.append((term, trunc))
    assert flags == [(False, False)] * (horizon - 1) + [(False, True)]
    # reset starts a fresh episode at the centre with a fresh clock
    obs, _ = e.reset()
    assert obs.tolist() == [4, 4]
    assert e.step(STAY)[3] is (horizon == 1)


def test_darkroom_default_horizon_is_20():
    e = gym.make("Darkroom-v0", goal=[0, 0])
    e.reset(seed=0)
    n = 0
    while True:
        n += 1
        _, _, term, trunc, _ = e.step(STAY)
        if term or trunc:
            break
    assert n == 20 and not term


# ----------------------------------------------------------------------------- key-to-door rewards

def test_key_to_door_door_before_key_gives_nothing_then_key_then_door():
    # door one step up, key one step right
    e = DarkKeyToDoorEnv(key=(5, 4), door=(4, 5))
    obs, _ = e.reset()
    assert obs.tolist() == [4, 4, 0]
    seq = [UP,      # door without key: 0
           DOWN, RIGHT,  # key: +1
           STAY,    # still on key: 0 (only once)
           LEFT, RIGHT,  # back on key: 0
           LEFT, UP,     # door with key: +1
           STAY, DOWN, UP]  # door again: 0
    out = [e.step(a) for a in seq]
    rewards = [o[1] for o in out]
    assert rewards == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    has_key = [int(o[0][2]) for o in out]
    assert has_key == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert sum(rewards) == 2


def test_key_to_door_key_equals_door_gives_two_on_one_step():
    e = DarkKeyToDoorEnv(key=(4, 6), door=(4, 6))
    e.reset()
    rewards = [e.step(a)[1] for a in [UP, UP, STAY, DOWN, UP]]
    assert rewards == [0, 2, 0, 0, 0]


def test_key_to_door_key_at_start_needs_one_step():
    e = DarkKeyToDoorEnv(key=(4, 4), door=(4, 3))
    e.reset()
    assert [e.step(a)[1] for a in [STAY, DOWN, UP, DOWN]] == [1, 1, 0, 0]


def test_key_to_door_truncates_at_horizon_and_reset_clears_key():
    e = DarkKeyToDoorEnv(key=(4, 5), door=(8, 8), horizon=3)
    e.reset()
    out = [e.step(a) for a in [UP, STAY, STAY]]
    assert [o[3] for o in out] == [False, False, True]
    assert not any(o[2] for o in out)
    assert out[-1][0].tolist() == [4, 5, 1]
    obs, _ = e.reset()
    assert obs.tolist() == [4, 4, 0]
    assert e.step(UP)[1] == 1.0  # the key can be picked up again in a new episode


def test_batched_key_to_door_rewards_and_flags():
    keys = [(4, 5), (4, 5), (4, 4)]
    doors = [(4, 5), (4, 6), (4, 4)]
    b = BatchedDarkKeyToDoor(keys, doors, horizon=4)
    obs = b.reset()
    assert obs.tolist() == [[4, 4, 0]] * 3
    obs, r, d = b.step([UP, UP, STAY])
    assert r.tolist() == [2, 1, 2]
    assert obs[:, 2].tolist() == [1, 1, 1]
    obs, r, d = b.step([UP, UP, STAY])
    assert r.tolist() == [0, 1, 0]
    assert not d.any()
    b.step([STAY] * 3)
    _, r, d = b.step([DOWN, DOWN, STAY])
    assert r.tolist() == [0, 0, 0]
    assert d.tolist() == [True] * 3


# ----------------------------------------------------------------------------- task lists and splits

def test_darkroom_task_list_is_all_81_goals():
    tasks = envs.task_list(dr_cfg())
    assert len(tasks) == 81
    goals = {tuple(t["goal"]) for t in tasks}
    assert goals == {(x, y) for x in range(9) for y in range(9)}
    assert all(set(t) == {"goal"} for t in tasks)
    json.dumps(tasks)  # stored as JSON in the dataset
    assert envs.task_list(dr_cfg()) == tasks  # stable order
    assert len(envs.task_list(dr_cfg(grid_size=5))) == 25


def test_key_to_door_task_list_is_all_6561_pairs():
    tasks = envs.task_list(kd_cfg())
    assert len(tasks) == 6561
    pairs = {(tuple(t["key"]), tuple(t["door"])) for t in tasks}
    cells = [(x, y) for x in range(9) for y in range(9)]
    assert pairs == {(k, d) for k in cells for d in cells}
    json.dumps(tasks)


@pytest.mark.parametrize("cfg,n_train,n_val,n_test", [
    (dr_cfg(), 65, 8, 8), (kd_cfg(), 5249, 656, 656), (dr_cfg(train_env_ratio=0.5, grid_size=4), 6, 2, 8),
    (dr_cfg(val_env_ratio=0.0), 73, 0, 8)])
def test_split_sizes_and_disjointness(cfg, n_train, n_val, n_test):
    split = envs.task_split(cfg)
    assert len(split) == len(envs.task_list(cfg))
    assert set(split) <= {"train", "val", "test"}
    parts = {w: envs.tasks_of_split(cfg, w) for w in ("train", "val", "test")}
    assert tuple(len(p) for p in parts.values()) == (n_train, n_val, n_test)
    assert sorted(sum(parts.values(), [])) == list(range(len(split)))
    assert envs.tasks_of_split(cfg, "all") == list(range(len(split)))
    assert all(split[i] == w for w, p in parts.items() for i in p)


def test_max_tasks_keeps_a_seeded_subset_in_order_and_splits_it():
    every = envs.task_list(kd_cfg())
    sub = envs.task_list(kd_cfg(max_tasks=650))
    assert len(sub) == 650 and envs.task_list(kd_cfg(max_tasks=650)) == sub
    positions = [every.index(t) for t in sub]
    assert positions == sorted(positions)  # the family's order, so indices stay readable
    assert envs.task_list(kd_cfg(max_tasks=650, env_split_seed=1)) != sub
    split = envs.task_split(kd_cfg(max_tasks=650))
    assert (split.count("train"), split.count("val"), split.count("test")) == (520, 65, 65)
    assert envs.task_list(kd_cfg(max_tasks=10**6)) == every  # more than there are: all of them


def test_validation_split_never_changes_the_test_tasks():
    for seed in range(4):
        with_val = envs.tasks_of_split(dr_cfg(env_split_seed=seed), "test")
        assert envs.tasks_of_split(dr_cfg(env_split_seed=seed, val_env_ratio=0.0), "test") == with_val
        assert with_val == envs.tasks_of_split(dr_cfg(env_split_seed=seed, val_env_ratio=0.3), "test")


def test_split_is_deterministic_and_depends_on_seed():
    a = envs.task_split(dr_cfg(env_split_seed=0))
    assert envs.task_split(dr_cfg(env_split_seed=0)) == a
    splits = {tuple(envs.task_split(dr_cfg(env_split_seed=s))) for s in range(6)}
    assert len(splits) == 6
    # a pure function of the seed and the ratio: nothing else (global RNG state) changes it
    np.random.seed(123)
    np.random.rand(10)
    assert envs.task_split(dr_cfg(env_split_seed=0)) == a
    # the ratio moves the sizes
    assert envs.task_split(dr_cfg(train_env_ratio=0.5, val_env_ratio=0.0)).count("train") in (40, 41)


def test_split_extremes():
    assert envs.tasks_of_split(dr_cfg(train_env_ratio=1.0), "test") == []
    assert envs.tasks_of_split(dr_cfg(train_env_ratio=0.0), "train") == []


# ----------------------------------------------------------------------------- optimal returns

def _step_toward(pos, target):
    if pos[0] < target[0]:
        return RIGHT
    if pos[0] > target[0]:
        return LEFT
    if pos[1] < target[1]:
        return UP
    if pos[1] > target[1]:
        return DOWN
    return STAY


def _darkroom_dp_optimum(goal, grid_size, horizon):
    """Exact optimum by backward induction over (position, time), independent of env code."""
    G = grid_size
    V = np.zeros((G, G))
    for _ in range(horizon):
        newV = np.full((G, G), -np.inf)
        for x in range(G):
            for y in range(G):
                for dx, dy in DELTA.values():
                    nx, ny = min(max(x + dx, 0), G - 1), min(max(y + dy, 0), G - 1)
                    newV[x, y] = max(newV[x, y], float((nx, ny) == tuple(goal)) + V[nx, ny])
        V = newV
    return V[G // 2, G // 2]


def test_darkroom_optimal_return_formula_all_goals():
    cfg = dr_cfg()
    for task in envs.task_list(cfg):
        d = manhattan(task["goal"], (4, 4))
        assert envs.optimal_return(cfg, task) == min(20, 21 - d), task


@pytest.mark.parametrize("grid_size,horizon", [(9, 20), (9, 5), (5, 3)])
def test_darkroom_optimal_return_is_achieved_and_not_beaten(grid_size, horizon):
    cfg = dr_cfg(grid_size=grid_size, horizon=horizon)
    for task in envs.task_list(cfg):
        opt = envs.optimal_return(cfg, task)
        # achieved: walk straight to the goal, then stay, in the registered gym env
        e = envs.make_gym_env(cfg, task)
        obs, _ = e.reset(seed=0)
        total, done = 0.0, False
        while not done:
            obs, r, term, trunc, _ = e.step(_step_toward(obs, task["goal"]))
            total += r
            done = term or trunc
        assert total == opt, task
        # not beaten: exact optimum by dynamic programming
        if grid_size == 9 and horizon == 20 and task["goal"][0] % 2:  # a sample keeps this fast
            continue
        assert _darkroom_dp_optimum(task["goal"], grid_size, horizon) == opt, task


def _kd_dp_optimum(keys, doors, grid_size, horizon):
    """Exact optimum for many key-to-door tasks at once: backward induction over
    (task, x, y, has_key, opened); independent of the env code."""
    G, N = grid_size, len(keys)
    keys, doors = np.asarray(keys), np.asarray(doors)
    xs, ys = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")
    V = np.zeros((N, G, G, 2, 2))
    for _ in range(horizon):
        newV = np.full_like(V, -np.inf)
        for dx, dy in DELTA.values():
            nx, ny = np.clip(xs + dx, 0, G - 1), np.clip(ys + dy, 0, G - 1)
            on_key = (nx[None] == keys[:, 0, None, None]) & (ny[None] == keys[:, 1, None, None])
            on_door = (nx[None] == doors[:, 0, None, None]) & (ny[None] == doors[:, 1, None, None])
            for hk in (0, 1):
                for op in (0, 1):
                    got_key = on_key & (hk == 0)
                    hk2 = (hk == 1) | got_key
                    opened_now = on_door & hk2 & (op == 0)
                    op2 = (op == 1) | opened_now
                    r = got_key.astype(float) + opened_now.astype(float)
                    idx_n = np.arange(N)[:, None, None]
                    cont = V[idx_n, nx[None], ny[None], hk2.astype(int), op2.astype(int)]
                    newV[:, :, :, hk, op] = np.maximum(newV[:, :, :, hk, op], r + cont)
        V = newV
    return V[:, G // 2, G // 2, 0, 0]


def _kd_greedy_batched(cfg, tasks):
    """Walk to the key (stay once if it is the start cell), then to the door."""
    b = envs.make_batched_env(cfg, tasks)
    obs = b.reset()
    keys = np.array([t["key"] for t in tasks])
    doors = np.array([t["door"] for t in tasks])
    total = np.zeros(len(tasks))
    for _ in range(cfg["horizon"]):
        target = np.where(obs[:, 2:3] == 1, doors, keys)
        acts = np.array([_step_toward(o, t) for o, t in zip(obs, target)])
        obs, r, _ = b.step(acts)
        total += r
    return total


@pytest.mark.parametrize("grid_size,horizon", [(9, 50), (9, 9), (9, 4), (5, 2), (5, 1)])
def test_key_to_door_optimal_return(grid_size, horizon):
    cfg = kd_cfg(grid_size=grid_size, horizon=horizon)
    tasks = envs.task_list(cfg)
    opt = np.array([envs.optimal_return(cfg, t) for t in tasks])
    if horizon == 50:
        assert (opt == 2).all()  # every pair is reachable within 50 steps on 9x9
    else:
        assert len(set(opt)) > 1  # the horizon matters: a formula error shows up
    # achieved by the greedy walk (batched env, all tasks)
    np.testing.assert_array_equal(_kd_greedy_batched(cfg, tasks), opt)
    # not beaten: exact DP (a deterministic sample of tasks for the 9x9 grid)
    rng = np.random.default_rng(0)
    n_sample = 300 if horizon < 20 else 60
    idx = np.arange(len(tasks)) if grid_size == 5 else rng.choice(len(tasks), n_sample, replace=False)
    start = grid_size // 2
    special = [i for i, t in enumerate(tasks) if t["key"] == t["door"] or t["key"] == [start, start]
               or t["door"] == [start, start]]
    idx = np.unique(np.concatenate([idx, special]))
    dp = _kd_dp_optimum([tasks[i]["key"] for i in idx], [tasks[i]["door"] for i in idx], grid_size, horizon)
    np.testing.assert_array_equal(dp, opt[idx])


def test_key_to_door_optimal_achieved_in_gym_env():
    cfg = kd_cfg(horizon=9)
    tasks = envs.task_list(cfg)
    rng = np.random.default_rng(1)
    sample = [tasks[i] for i in rng.choice(len(tasks), 60, replace=False)]
    sample += [{"key": [4, 4], "door": [4, 4]}, {"key": [4, 4], "door": [2, 4]},
               {"key": [4, 6], "door": [4, 6]}, {"key": [0, 0], "door": [8, 8]}]
    for task in sample:
        e = envs.make_gym_env(cfg, task)
        obs, _ = e.reset(seed=0)
        total, done = 0.0, False
        while not done:
            target = task["door"] if obs[2] else task["key"]
            obs, r, term, trunc, _ = e.step(_step_toward(obs, target))
            total += r
            done = term or trunc
        assert total == envs.optimal_return(cfg, task), task
    assert envs.optimal_return(cfg, {"key": [0, 0], "door": [8, 8]}) == 1.0
    assert envs.optimal_return(cfg, {"key": [4, 3], "door": [4, 3]}) == 2.0
    assert envs.optimal_return(kd_cfg(horizon=7), {"key": [0, 0], "door": [0, 0]}) == 0.0
    assert envs.optimal_return(cfg, {"key": [4, 4], "door": [4, 4]}) == 2.0


# ----------------------------------------------------------------------------- batched == gym

def _compare_batched_with_gym(cfg, tasks, n_episodes, seed):
    rng = np.random.default_rng(seed)
    gyms = [envs.make_gym_env(cfg, t) for t in tasks]
    b = envs.make_batched_env(cfg, tasks)
    n_checked = 0
    for _ in range(n_episodes):
        obs_b = b.reset()
        obs_g = np.stack([g.reset()[0] for g in gyms])
        np.testing.assert_array_equal(obs_b, obs_g)
        for _t in range(cfg["horizon"]):
            acts = rng.integers(0, 5, len(tasks))
            obs_b, r_b, d_b = b.step(acts)
            outs = [g.step(int(a)) for g, a in zip(gyms, acts)]
            np.testing.assert_array_equal(obs_b, np.stack([o[0] for o in outs]))
            np.testing.assert_array_equal(r_b, np.array([o[1] for o in outs], dtype=np.float32))
            np.testing.assert_array_equal(d_b, np.array([o[2] or o[3] for o in outs]))
            n_checked += len(tasks)
    return n_checked


def test_batched_darkroom_matches_gym_all_goals():
    cfg = dr_cfg()
    tasks = envs.task_list(cfg)
    b = envs.make_batched_env(cfg, tasks)
    assert isinstance(b, BatchedDarkroom) and b.state_dim == envs.state_dim(cfg) == 2
    assert b.n_actions == envs.n_actions(cfg) == 5
    # repeat a few tasks: copies of one task are independent
    tasks = tasks + tasks[:5]
    assert _compare_batched_with_gym(cfg, tasks, n_episodes=3, seed=0) == 3 * 20 * len(tasks)


def test_batched_darkroom_matches_gym_small_grid_rewards_happen():
    # on a 3x3 grid random walks hit the goal often, so rewards are compared, not just zeros
    cfg = dr_cfg(grid_size=3, horizon=10)
    tasks = envs.task_list(cfg) * 4
    _compare_batched_with_gym(cfg, tasks, n_episodes=2, seed=1)
    b = envs.make_batched_env(cfg, tasks)
    b.reset()
    total = sum(b.step(np.random.default_rng(2).integers(0, 5, len(tasks)))[1].sum() for _ in range(10))
    assert total > 0


def test_batched_key_to_door_matches_gym_many_tasks():
    cfg = kd_cfg(horizon=30)
    all_tasks = envs.task_list(cfg)
    rng = np.random.default_rng(3)
    tasks = [all_tasks[i] for i in rng.choice(len(all_tasks), 120, replace=False)]
    tasks += [{"key": [4, 4], "door": [4, 4]}, {"key": [4, 5], "door": [4, 5]}, {"key": [4, 4], "door": [4, 5]}]
    b = envs.make_batched_env(cfg, tasks)
    assert isinstance(b, BatchedDarkKeyToDoor) and b.state_dim == envs.state_dim(cfg) == 3
    _compare_batched_with_gym(cfg, tasks, n_episodes=2, seed=4)


def test_batched_key_to_door_matches_gym_small_grid_all_tasks():
    cfg = kd_cfg(grid_size=3, horizon=12)
    tasks = envs.task_list(cfg) * 2  # 81 x 2: keys and doors are hit often
    _compare_batched_with_gym(cfg, tasks, n_episodes=2, seed=5)


# ----------------------------------------------------------------------------- gymnasium registry

def test_registered_ids_work_with_gym_make():
    assert envs.GYM_IDS == {"darkroom": "Darkroom-v0", "dark_key_to_door": "DarkKeyToDoor-v0",
                            "bandit": "BernoulliBandit-v0", "point_robot": "PointRobot-v0"}
    e = gym.make("Darkroom-v0", goal=[4, 5], grid_size=9, horizon=20)  # with the env checker
    obs, _ = e.reset(seed=0)
    assert e.observation_space.contains(obs) and e.action_space.n == 5
    obs, r, term, trunc, _ = e.step(UP)
    assert obs.tolist() == [4, 5] and r == 1.0
    assert isinstance(e.unwrapped, DarkroomEnv)

    e = gym.make("DarkKeyToDoor-v0", key=[4, 5], door=[4, 6], grid_size=9, horizon=50)
    obs, _ = e.reset(seed=0)
    assert e.observation_space.contains(obs) and obs.shape == (3,)
    assert e.step(UP)[1] == 1.0 and e.step(UP)[1] == 1.0
    assert isinstance(e.unwrapped, DarkKeyToDoorEnv)

    for gym_id, kwargs in (("BernoulliBandit-v0", {"means": [0.0, 1.0]}), ("PointRobot-v0", {"goal": [0.0, 1.0]})):
        e = gym.make(gym_id, **kwargs)  # the new families' envs pass the env checker too
        obs, _ = e.reset(seed=0)
        assert e.observation_space.contains(obs) and e.observation_space.contains(e.step(1)[0])


def test_make_gym_env_uses_config_and_task():
    cfg = dr_cfg(grid_size=5, horizon=3)
    e = envs.make_gym_env(cfg, {"goal": [2, 3]})
    obs, _ = e.reset()
    assert obs.tolist() == [2, 2]
    out = [e.step(a) for a in (UP, STAY, STAY)]
    assert [o[1] for o in out] == [1, 1, 1]
    assert out[-1][3] is True
    e = envs.make_gym_env(kd_cfg(grid_size=5, horizon=2), {"key": [2, 3], "door": [2, 3]})
    e.reset()
    assert e.step(UP)[1] == 2.0
    assert e.step(STAY)[3] is True
