"""Point robot: a 2-D point with an invisible goal on a half circle, moved by discrete steps.

The classic meta-RL navigation task (the sparse point robot of PEARL / VariBAD-style
benchmarks) with discrete moves: the robot starts at the origin; actions 0 stay, 1 up
(y + step), 2 down, 3 left (x - step), 4 right, `robot_step` long; positions are clipped to
[-1.5, 1.5]^2. The goal lies on the upper half of the unit circle; reward 1 on every step
the robot is within `goal_radius` of it, 0 elsewhere. The observation is the position only
(a `Box`), so the goal must be found by exploring and remembered, as in darkroom.

Why this reward: sparse (nothing until the goal disc is found, so a learner must explore and
an in-context learner must use its history), yet learnable by PPO from a fixed start: the
disc (radius 0.3 at step 0.1: about 28 lattice points) is 7-10 moves from the start, like
darkroom's goals, and the half circle keeps every goal reachable in the horizon. Measured with
config/algorithm/ppo_point_robot.yaml on 10 of the 60 goals: at radius 0.2 PPO never found 2 of
them in 48 episodes (ent_coef 0.01 did not help), at radius 0.3 it missed 1 and reached 97-99%
of optimal on the others.
Tasks: `robot_goals` goal angles evenly spaced over [0, pi] (a fixed list; neighbouring goals'
discs overlap, so held-out goals lie between trained ones).

Positions are multiples of the step (start and moves are), so the optimal return is exact:
the fewest moves to a lattice point inside the disc (`optimal_return`).
"""
import math

import gymnasium as gym
import numpy as np

from config.schema import add_keys
from env.family import MAX_TASKS, Family, register

add_keys("env", family="point_robot",
         robot_goals=(int, 100, "point_robot: goals, evenly spaced on the upper half of the unit circle", {"min": 2}),
         robot_step=(float, 0.1, "point_robot: length of one move", {"min": 0.01, "max": 1.0}),
         goal_radius=(float, 0.3, "point_robot: reward 1 on every step within this distance of the goal",
                      {"min": 0.01, "max": 1.0}))

BOUND = 1.5  # positions are clipped to [-BOUND, BOUND]^2
MOVES = np.array([[0, 0], [0, 1], [0, -1], [-1, 0], [1, 0]], dtype=np.float64)  # stay, up, down, left, right


def observation_space() -> gym.spaces.Box:
    return gym.spaces.Box(-BOUND, BOUND, (2,), np.float32)


def goal_at(angle: float) -> list[float]:
    return [round(math.cos(angle), 6), round(math.sin(angle), 6)]


def _move(pos: np.ndarray, actions, step: float) -> np.ndarray:
    return np.clip(pos + step * MOVES[np.asarray(actions)], -BOUND, BOUND)


def _in_goal(pos: np.ndarray, goal: np.ndarray, radius: float) -> np.ndarray:
    return np.linalg.norm(pos - goal, axis=-1) <= radius + 1e-9


class PointRobotEnv(gym.Env):
    """One goal as a gymnasium env (the sb3 backend and the tests)."""
    metadata = {"render_modes": []}

    def __init__(self, goal=(1.0, 0.0), horizon: int = 30, robot_step: float = 0.1, goal_radius: float = 0.2):
        self.goal, self.horizon = np.asarray(goal, dtype=np.float64), horizon
        self.step_size, self.radius = robot_step, goal_radius
        self.observation_space = observation_space()
        self.action_space = gym.spaces.Discrete(len(MOVES))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = np.zeros(2), 0
        return self.pos.astype(np.float32), {}

    def step(self, action):
        self.pos = _move(self.pos, int(action), self.step_size)
        self.t += 1
        reward = float(_in_goal(self.pos, self.goal, self.radius))
        return self.pos.astype(np.float32), reward, False, self.t >= self.horizon, {}


class BatchedPointRobot:
    """Many goals stepped at once; positions in float64 (as the gym env), observed as float32."""

    def __init__(self, goals, horizon: int, robot_step: float, goal_radius: float):
        self.goals = np.asarray(goals, dtype=np.float64).reshape(-1, 2)
        self.n, self.horizon, self.step_size, self.radius = len(self.goals), horizon, robot_step, goal_radius

    def reset(self) -> np.ndarray:
        self.pos, self.t = np.zeros((self.n, 2)), 0
        return self.pos.astype(np.float32)

    def step(self, actions):
        self.pos = _move(self.pos, actions, self.step_size)
        self.t += 1
        rewards = _in_goal(self.pos, self.goals, self.radius).astype(np.float32)
        return self.pos.astype(np.float32), rewards, np.full(self.n, self.t >= self.horizon)


def moves_to_goal(goal, step: float, radius: float) -> int:
    """Fewest moves from the origin to a position within `radius` of `goal`: positions after
    n moves are the lattice points (i, j) * step with |i| + |j| <= n (staying is allowed)."""
    reach = int(math.ceil((abs(goal[0]) + abs(goal[1]) + radius) / step)) + 1
    i, j = np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1), indexing="ij")
    points = np.stack([i, j], -1) * step
    in_bounds = (np.abs(points) <= BOUND + 1e-9).all(-1)  # moves are clipped: points outside are never reached
    inside = _in_goal(points, np.asarray(goal), radius) & in_bounds
    return int((np.abs(i) + np.abs(j))[inside].min())


class PointRobot(Family):
    name, gym_id, gym_class = "point_robot", "PointRobot-v0", PointRobotEnv
    size_keys = ("robot_goals",)

    def n_tasks(self, cfg):
        return cfg["robot_goals"]

    def size_hint(self, cfg):
        return f"use robot_goals <= {MAX_TASKS:,}"

    def tasks(self, cfg):
        n = cfg["robot_goals"]
        return [{"goal": goal_at(math.pi * k / (n - 1))} for k in range(n)]

    def optimal_return(self, cfg, task):
        # walk straight into the disc, then stay: every step from the d-th on is rewarded
        d = moves_to_goal(task["goal"], cfg["robot_step"], cfg["goal_radius"])
        return float(max(0, cfg["horizon"] - d + 1)) if d else float(cfg["horizon"])

    def n_actions(self, cfg):
        return len(MOVES)

    def observation_space(self, cfg):
        return observation_space()

    def make_batched_env(self, cfg, tasks):
        return BatchedPointRobot([t["goal"] for t in tasks], cfg["horizon"], cfg["robot_step"], cfg["goal_radius"])

    def gym_kwargs(self, cfg):
        return {"horizon": cfg["horizon"], "robot_step": cfg["robot_step"], "goal_radius": cfg["goal_radius"]}


register(PointRobot())
