"""What every source of learning histories shares (PPO's two backends, QLearning,
PosteriorSampling, NoisyExpert): a task's seed, and the recorder of a chunk's arrays in the
file's layout.
"""
import numpy as np

from algorithm.history import compress_markers


def task_seed(alg_seed: int, task_index: int) -> int:
    """A task's own seed: its history does not depend on which other tasks are collected with it."""
    return int(np.random.SeedSequence([alg_seed, task_index]).generate_state(1)[0])


class History:
    """The recorded arrays of a chunk, laid out (learner, T, stream, ...): a task's learners
    are consecutive rows (one row per task where a source has one learner per task), and
    `task` joins their streams into the file's (T, stream, ...) layout."""

    def __init__(self, n_learners: int, T: int, streams: int, state_dim: int):
        shape = (n_learners, T, streams)
        self.states = np.zeros((*shape, state_dim), np.float32)
        self.next_states = np.zeros((*shape, state_dim), np.float32)
        self.actions = np.zeros(shape, np.int16)
        self.rewards = np.zeros(shape, np.float32)
        self.dones = np.zeros(shape, bool)

    def record(self, t: int, states, actions, rewards, next_states, dones):
        """One env step; all arguments are (n_learners * streams per learner, ...), learner-major."""
        n = self.states.shape[0]
        self.states[:, t] = states.reshape(n, -1, states.shape[-1])
        self.actions[:, t] = actions.reshape(n, -1)
        self.rewards[:, t] = rewards.reshape(n, -1)
        self.next_states[:, t] = next_states.reshape(n, -1, next_states.shape[-1])
        self.dones[:, t] = dones.reshape(n, -1)

    def task(self, slots: slice, n_steps: int) -> dict:
        """One task's history: the streams of its learners' `slots`, side by side."""
        def streams(a):
            part = a[slots]
            return part[0] if len(part) == 1 else np.concatenate(list(part), axis=1)
        out = {k: streams(getattr(self, k)) for k in ("states", "actions", "rewards", "next_states", "dones")}
        T, S = out["actions"].shape
        return {**out, "compress_markers": compress_markers(T, n_steps, S)}
