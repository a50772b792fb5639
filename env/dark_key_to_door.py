"""Dark Key-to-Door: find an invisible key, then an invisible door.

+1 the first time the agent stands on the key, +1 the first time it stands on the door
while holding the key (both can happen on one step when key and door share a cell).
Same moves and start as darkroom. The observation is (x, y, has_key): with the key flag
the source learner's problem is Markov; the key and door positions stay hidden.
"""
import gymnasium as gym
import numpy as np

from env.darkroom import MOVES, N_ACTIONS, Darkroom, start_position, step_toward
from env.family import register


def _rewards(pos, key, door, has_key, opened):
    on_key = (pos == key).all(-1) & ~has_key
    has_key = has_key | on_key
    on_door = (pos == door).all(-1) & has_key & ~opened
    return on_key.astype(np.float32) + on_door.astype(np.float32), has_key, opened | on_door


def observation_space(grid_size: int) -> gym.spaces.MultiDiscrete:
    return gym.spaces.MultiDiscrete([grid_size, grid_size, 2])  # (x, y, has_key)


class DarkKeyToDoorEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, key=(0, 0), door=(1, 1), grid_size: int = 9, horizon: int = 50):
        self.key, self.door = np.asarray(key, dtype=np.int64), np.asarray(door, dtype=np.int64)
        self.grid_size, self.horizon = grid_size, horizon
        self.observation_space = observation_space(grid_size)
        self.action_space = gym.spaces.Discrete(N_ACTIONS)

    def _obs(self):
        return np.array([*self.pos, int(self.has_key)], dtype=np.int64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = start_position(self.grid_size), 0
        self.has_key, self.opened = False, False
        return self._obs(), {}

    def step(self, action):
        self.pos = np.clip(self.pos + MOVES[int(action)], 0, self.grid_size - 1)
        self.t += 1
        reward = 0.0
        if not self.has_key and (self.pos == self.key).all():
            self.has_key, reward = True, reward + 1.0
        if self.has_key and not self.opened and (self.pos == self.door).all():
            self.opened, reward = True, reward + 1.0
        return self._obs(), reward, False, self.t >= self.horizon, {}


class BatchedDarkKeyToDoor:
    """Many key-to-door tasks stepped at once; see BatchedDarkroom for the clock."""
    state_dim = 3
    n_actions = N_ACTIONS

    def __init__(self, keys, doors, grid_size: int = 9, horizon: int = 50):
        self.keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
        self.doors = np.asarray(doors, dtype=np.int64).reshape(-1, 2)
        self.grid_size, self.horizon = grid_size, horizon
        self.n = len(self.keys)

    def _obs(self):
        return np.concatenate([self.pos, self.has_key[:, None].astype(np.int64)], axis=1)

    def reset(self) -> np.ndarray:
        self.pos = np.tile(start_position(self.grid_size), (self.n, 1))
        self.has_key = np.zeros(self.n, dtype=bool)
        self.opened = np.zeros(self.n, dtype=bool)
        self.t = 0
        return self._obs()

    def step(self, actions):
        self.pos = np.clip(self.pos + MOVES[np.asarray(actions)], 0, self.grid_size - 1)
        self.t += 1
        rewards, self.has_key, self.opened = _rewards(self.pos, self.keys, self.doors, self.has_key, self.opened)
        dones = np.full(self.n, self.t >= self.horizon)
        return self._obs(), rewards, dones


class DarkKeyToDoor(Darkroom):
    """Darkroom's moves, with a (key, door) pair per task."""
    name, gym_id, gym_class = "dark_key_to_door", "DarkKeyToDoor-v0", DarkKeyToDoorEnv
    hidden_cells = 2  # the key, then the door
    pays_once_per_hidden_cell = True  # +1 at each, the first time: a learner may count its rewards as stages

    def tasks(self, cfg):
        cells = [[x, y] for x in range(cfg["grid_size"]) for y in range(cfg["grid_size"])]
        return [{"key": k, "door": d} for k in cells for d in cells]

    def optimal_return(self, cfg, task):
        start = start_position(cfg["grid_size"])
        to_key = int(np.abs(np.array(task["key"]) - start).sum())
        to_door = int(np.abs(np.array(task["door"]) - np.array(task["key"])).sum())
        # the first reward can come no earlier than step max(1, d): "stay" counts as a step
        t_key = max(1, to_key)
        t_door = t_key + to_door
        return float((t_key <= cfg["horizon"]) + (t_door <= cfg["horizon"]))

    def observation_space(self, cfg):
        return observation_space(cfg["grid_size"])

    def expert(self, cfg, tasks):
        """To the key, then to the door (and stay there)."""
        keys = np.array([t["key"] for t in tasks], dtype=np.int64)
        doors = np.array([t["door"] for t in tasks], dtype=np.int64)
        return lambda states: step_toward(states[:, :2].astype(np.int64), np.where(states[:, 2:3] > 0, doors, keys))

    def make_batched_env(self, cfg, tasks):
        return BatchedDarkKeyToDoor([t["key"] for t in tasks], [t["door"] for t in tasks],
                                    cfg["grid_size"], cfg["horizon"])


register(DarkKeyToDoor())
