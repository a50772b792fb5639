"""Learning histories from a learner that searches by posterior sampling (`alg: PosteriorSampling`).

PPO learns Dark Key-to-Door slowly and by weight updates shared across a task's streams;
the noisy expert (algorithm/noisy_expert.py) improves because its noise is turned down, not
because it found anything. This learner improves only through what its own stream has
seen, and fast: it is posterior sampling (Thompson sampling, as in PSRL) with the task
prior, for grid tasks whose reward hides in cells found in order (darkroom: the goal;
Dark Key-to-Door: the key, then the door). It knows the moves and the reward rules, not
the cells.

It keeps, per stream and hidden cell, the set of cells that may still hold it (uniform
prior over the grid). A visit without the reward rules a cell out; the reward pins the
cell down, for every later episode of the stream. In each episode it samples a candidate
for the cell it looks for next, walks there along a shortest path (`step_toward`), and
samples again whenever the candidate is ruled out (on the way or on arrival); once every
cell has been found in the episode it stays put. Its draws come from the task's own
generator (algorithm/policy_loop.py), so streams differ and a task's history does not depend
on its chunk.
"""
import numpy as np

import env as envs
from errors import ConfigError


def policy_bytes_per_stream(cfg: dict) -> int:
    """A stream's candidate cells for each hidden cell (one byte each)."""
    return envs.family(cfg).hidden_cells * cfg["grid_size"] ** 2


class PosteriorSampler:
    bytes_per_stream = staticmethod(policy_bytes_per_stream)  # what collect.py budgets per stream

    def __init__(self, cfg: dict, copies: list[dict], generators: list):
        self.generators, self.n_stream = generators, cfg["n_stream"]
        self.grid = cfg["grid_size"]
        family = envs.family(cfg)
        self.n_hidden, self.step_toward = family.hidden_cells, family.step_toward
        n = len(copies)
        # candidates[i, h, c]: cell c may still hold hidden cell h of copy i
        self.candidates = np.ones((n, self.n_hidden, self.grid * self.grid), dtype=bool)
        self.rows = np.arange(n)

    def new_episode(self):
        n = len(self.rows)
        self.found = np.zeros(n, dtype=np.int64)    # hidden cells reached in this episode
        self.target = np.zeros(n, dtype=np.int64)   # the sampled candidate (a cell index)
        self.target_of = np.full(n, -1)             # which hidden cell the target is for

    def _draw(self, k: int) -> np.ndarray:
        """k uniforms per copy, from each task's own generator, in task order."""
        return np.concatenate([g.random((self.n_stream, k)) for g in self.generators])

    def _resample(self, looking: np.ndarray, u: np.ndarray):
        """A new target, uniform over the candidates, where the old one is no longer one."""
        h = np.minimum(self.found, self.n_hidden - 1)
        cands = self.candidates[self.rows, h]
        stale = looking & ((self.target_of != self.found) | ~cands[self.rows, self.target])
        if not stale.any():
            return
        counts = cands[stale].sum(1)
        pick = np.floor(u[stale] * counts).astype(np.int64)  # the pick-th candidate, counting from 0
        self.target[stale] = (np.cumsum(cands[stale], axis=1) > pick[:, None]).argmax(1)
        self.target_of[stale] = self.found[stale]

    def act(self, states, episode):
        u = self._draw(1)
        looking = self.found < self.n_hidden
        self._resample(looking, u[:, 0])
        pos = states[:, :2].astype(np.int64)
        goal = np.stack([self.target // self.grid, self.target % self.grid], axis=1)
        return np.where(looking, self.step_toward(pos, goal), 0)

    def observe(self, next_states, rewards):
        """Pin down the hidden cells a reward announced, and rule the cell just visited out for
        the next one looked for (had it been there, the reward would have said so)."""
        cell = next_states[:, 0].astype(np.int64) * self.grid + next_states[:, 1].astype(np.int64)
        looking = self.found < self.n_hidden
        before = self.found
        after = np.where(looking, np.minimum(before + np.rint(rewards).astype(np.int64), self.n_hidden), before)
        for h in range(self.n_hidden):
            pinned = looking & (before <= h) & (h < after)
            self.candidates[pinned, h] = False
            self.candidates[pinned, h, cell[pinned]] = True
        self.found = after
        still = np.flatnonzero(after < self.n_hidden)
        self.candidates[still, after[still], cell[still]] = False
        if not self.candidates[still, after[still]].any(1).all():
            raise RuntimeError("posterior sampling ruled out every cell: the env's reward rules "
                               "differ from the ones this learner assumes")

    @staticmethod
    def check(cfg: dict):
        """Stop before any work where the family is not a grid with hidden reward cells."""
        if not getattr(envs.family(cfg), "hidden_cells", 0):
            raise ConfigError(f"alg=PosteriorSampling searches grid cells, and env={cfg['env']} has none "
                              "to search; use alg=PPO")
