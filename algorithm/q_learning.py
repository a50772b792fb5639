"""Learning histories from tabular Q-learning, one independent learner per stream (`alg: QLearning`).

An RL learner that improves only from its own stream's experience, and fast: it knows
nothing of the task (no model of the moves, no idea where reward lies) and learns action
values from its own transitions and rewards. Each stream has a Q table over (x, y, stage,
action), where (x, y) is the observed cell and the stage is the stream's own count of rewards
received so far in the current episode (0 .. the family's number of reward cells; for Dark
Key-to-Door 0, 1, 2: the reward history the AD model also sees in its context).

- Optimistic initialisation (`q_init`, e.g. the maximal return 2): an action never tried
  looks better than any tried one that paid nothing, so the greedy policy explores
  systematically, and stops exploring where rewards are found.
- Greedy actions, ties broken uniformly at random, plus epsilon-random actions (`q_epsilon`).
- One-step Q-learning after every step (`q_alpha`, `q_gamma`). Episodes end at the
  horizon: a time limit, not a terminal state, so every update bootstraps from the next state.
- `q_replay`: at each episode end, the episode's transitions are replayed backwards
  (experience replay, still Q-learning), so a reward found at step 16 reaches the start
  state in one episode instead of 16.

Every random draw comes from the task's own generator (algorithm/policy_loop.py), task by task
in a fixed order, so streams differ and a task's history does not depend on its chunk.
Runs grid families whose observation starts with the cell (x, y) and whose rewards come from
hidden cells (darkroom, Dark Key-to-Door); others are refused.
"""
import numpy as np

import env as envs
from errors import ConfigError


def n_stages(cfg: dict) -> int:
    """Stages of the learner's state: rewards counted so far this episode, 0 .. hidden cells,
    where a family pays once per hidden cell (Dark Key-to-Door). Darkroom pays at every step on
    the goal, so its count says nothing: one stage."""
    family = envs.family(cfg)
    return family.hidden_cells + 1 if getattr(family, "pays_once_per_hidden_cell", False) else 1


def policy_bytes_per_stream(cfg: dict) -> int:
    """A stream's Q table (float64 over cells x stages x actions) and its episode kept for replay
    (per step: two cells, two stages, an action and a reward, 8 bytes each)."""
    table = cfg["grid_size"] ** 2 * n_stages(cfg) * envs.n_actions(cfg) * 8
    return table + (cfg["horizon"] * 8 * 8 if cfg["q_replay"] else 0)


class QLearner:
    bytes_per_stream = staticmethod(policy_bytes_per_stream)  # what collect.py budgets per stream

    def __init__(self, cfg: dict, copies: list[dict], generators: list):
        self.generators, self.n_stream = generators, cfg["n_stream"]
        self.alpha, self.gamma, self.epsilon = cfg["q_alpha"], cfg["q_gamma"], cfg["q_epsilon"]
        self.replay = cfg["q_replay"]
        self.n_actions = envs.n_actions(cfg)
        self.stages = n_stages(cfg)
        g, n = cfg["grid_size"], len(copies)
        self.q = np.full((n, g, g, self.stages, self.n_actions), cfg["q_init"], dtype=np.float64)
        self.rows = np.arange(n)
        self.episode = []  # (cell, stage, action, reward, next cell, next stage) of this episode

    def new_episode(self):
        if self.replay and self.episode:
            for transition in reversed(self.episode):
                self._update(*transition)
        self.episode = []
        self.stage = np.zeros(len(self.rows), dtype=np.int64)

    def _draw(self, k: int) -> np.ndarray:
        """k uniforms per copy, from each task's own generator, in task order."""
        return np.concatenate([g.random((self.n_stream, k)) for g in self.generators])

    def act(self, states, episode):
        u = self._draw(self.n_actions + 2)
        self.cell = states[:, :2].astype(np.int64)
        q = self.q[self.rows, self.cell[:, 0], self.cell[:, 1], self.stage]  # (n, actions)
        best = q >= q.max(1, keepdims=True)
        greedy = np.where(best, u[:, :self.n_actions], -1.0).argmax(1)  # a uniform pick among the best
        random = np.minimum((u[:, -1] * self.n_actions).astype(np.int64), self.n_actions - 1)
        self.action = np.where(u[:, -2] < self.epsilon, random, greedy)
        return self.action

    def _update(self, cell, stage, action, reward, next_cell, next_stage):
        target = reward + self.gamma * self.q[self.rows, next_cell[:, 0], next_cell[:, 1], next_stage].max(1)
        index = (self.rows, cell[:, 0], cell[:, 1], stage, action)
        self.q[index] += self.alpha * (target - self.q[index])

    def observe(self, next_states, rewards):
        next_cell = next_states[:, :2].astype(np.int64)
        next_stage = np.minimum(self.stage + np.rint(rewards).astype(np.int64), self.stages - 1)
        transition = (self.cell, self.stage, self.action, np.asarray(rewards, dtype=np.float64), next_cell, next_stage)
        self._update(*transition)
        if self.replay:
            self.episode.append(transition)
        self.stage = next_stage

    @staticmethod
    def check(cfg: dict):
        """Stop before any work where the family is not a grid whose cell the observation gives."""
        if not getattr(envs.family(cfg), "hidden_cells", 0):
            raise ConfigError(f"alg=QLearning keeps a table over grid cells, and env={cfg['env']} is no grid "
                              "with hidden reward cells; use alg=PPO")
