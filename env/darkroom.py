"""Darkroom: a grid, start in the centre, an invisible goal; reward 1 on every step spent on it.

Actions: 0 stay, 1 up (y+1), 2 down (y-1), 3 left (x-1), 4 right (x+1); moves into the wall
leave the agent where it is. The observation is the agent's (x, y) only: the goal must be
found by exploring, which is what makes in-context learning necessary. Episodes always run
to the horizon (no early termination), so every episode of every task has the same length.
"""
import gymnasium as gym
import numpy as np

from env.family import MAX_TASKS, Family, register

N_ACTIONS = 5
MOVES = np.array([[0, 0], [0, 1], [0, -1], [-1, 0], [1, 0]], dtype=np.int64)


def start_position(grid_size: int) -> np.ndarray:
    return np.array([grid_size // 2, grid_size // 2], dtype=np.int64)


def observation_space(grid_size: int) -> gym.spaces.MultiDiscrete:
    return gym.spaces.MultiDiscrete([grid_size, grid_size])  # (x, y)


def step_toward(pos: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The shortest-path action from each pos (N, 2) to its target (N, 2): along x first,
    then y; stay once there."""
    dx, dy = (target - pos).T
    return np.select([dx > 0, dx < 0, dy > 0, dy < 0], [4, 3, 1, 2], default=0)


class DarkroomEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, goal=(0, 0), grid_size: int = 9, horizon: int = 20):
        self.goal = np.asarray(goal, dtype=np.int64)
        self.grid_size, self.horizon = grid_size, horizon
        self.observation_space = observation_space(grid_size)
        self.action_space = gym.spaces.Discrete(N_ACTIONS)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = start_position(self.grid_size), 0
        return self.pos.copy(), {}

    def step(self, action):
        self.pos = np.clip(self.pos + MOVES[int(action)], 0, self.grid_size - 1)
        self.t += 1
        reward = float((self.pos == self.goal).all())
        return self.pos.copy(), reward, False, self.t >= self.horizon, {}


class BatchedDarkroom:
    """Many darkroom tasks stepped at once with numpy; all copies share one clock.

    `goals` is (N, 2). step() does not reset: after `horizon` steps every copy is done at
    the same time and the caller calls reset().
    """
    state_dim = 2
    n_actions = N_ACTIONS

    def __init__(self, goals, grid_size: int = 9, horizon: int = 20):
        self.goals = np.asarray(goals, dtype=np.int64).reshape(-1, 2)
        self.grid_size, self.horizon = grid_size, horizon
        self.n = len(self.goals)

    def reset(self) -> np.ndarray:
        self.pos = np.tile(start_position(self.grid_size), (self.n, 1))
        self.t = 0
        return self.pos.copy()

    def step(self, actions):
        self.pos = np.clip(self.pos + MOVES[np.asarray(actions)], 0, self.grid_size - 1)
        self.t += 1
        rewards = (self.pos == self.goals).all(axis=1).astype(np.float32)
        dones = np.full(self.n, self.t >= self.horizon)
        return self.pos.copy(), rewards, dones


class Darkroom(Family):
    name, gym_id, gym_class = "darkroom", "Darkroom-v0", DarkroomEnv
    hidden_cells = 1  # the goal: alg PosteriorSampling searches for it (the key, then the door: 2)
    size_keys = ("grid_size",)

    def n_tasks(self, cfg):
        return cfg["grid_size"] ** (2 * self.hidden_cells)  # a cell per hidden thing

    def size_hint(self, cfg):
        largest = int(MAX_TASKS ** (1 / (2 * self.hidden_cells)))
        while (largest + 1) ** (2 * self.hidden_cells) <= MAX_TASKS:
            largest += 1
        return f"use grid_size <= {largest}"

    def tasks(self, cfg):
        g = cfg["grid_size"]
        return [{"goal": [x, y]} for x in range(g) for y in range(g)]

    def optimal_return(self, cfg, task):
        # walking straight there takes d steps; every step from the d-th on is on the goal
        d = int(np.abs(np.array(task["goal"]) - start_position(cfg["grid_size"])).sum())
        return float(min(cfg["horizon"], max(0, cfg["horizon"] - d + 1)))

    def n_actions(self, cfg):
        return N_ACTIONS

    def observation_space(self, cfg):
        return observation_space(cfg["grid_size"])

    def gym_kwargs(self, cfg):
        return {"grid_size": cfg["grid_size"], "horizon": cfg["horizon"]}

    step_toward = staticmethod(step_toward)  # how alg PosteriorSampling walks to a candidate cell

    def expert(self, cfg, tasks):
        goals = np.array([t["goal"] for t in tasks], dtype=np.int64)
        return lambda states: step_toward(states[:, :2].astype(np.int64), goals)

    def make_batched_env(self, cfg, tasks):
        return BatchedDarkroom([t["goal"] for t in tasks], cfg["grid_size"], cfg["horizon"])


register(Darkroom())
