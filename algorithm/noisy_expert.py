"""Learning histories without a learner: an expert with decaying noise (`alg: NoisyExpert`).

AD-epsilon (Zisman et al. 2023, "Emergence of in-context reinforcement learning from noise
distillation") replaces the RL learner that makes AD's data by an expert that knows the
task and acts epsilon-greedily: with probability epsilon a uniformly random action,
otherwise the expert's. Epsilon falls from 1 to 0 over a stream's episodes, so each stream
"improves" the way a learner would, but every improvement is one its own history shows
(no other stream's discovery, no hidden weight update).

Here epsilon falls linearly over the first `noise_decay_episodes` episodes of a stream:
episode e (from 0) is played with epsilon = max(0, 1 - e / noise_decay_episodes). The
streams of a task differ only in their random draws, from the task's own generator
(algorithm/policy_loop.py runs the streams and writes the file's layout).
"""
import numpy as np

import env as envs
from errors import ConfigError


def epsilon(cfg: dict, episode: int) -> float:
    return max(0.0, 1.0 - episode / cfg["noise_decay_episodes"])


class NoisyExpert:
    def __init__(self, cfg: dict, copies: list[dict], generators: list):
        self.cfg, self.generators = cfg, generators
        self.expert = envs.expert(cfg, copies)
        self.n_actions, self.n_stream = envs.n_actions(cfg), cfg["n_stream"]

    def new_episode(self):
        pass

    def act(self, states, episode):
        S = self.n_stream
        draws = [(g.random(S), g.integers(self.n_actions, size=S)) for g in self.generators]
        explore = np.concatenate([u for u, _ in draws]) < epsilon(self.cfg, episode)
        return np.where(explore, np.concatenate([a for _, a in draws]), self.expert(states))

    def observe(self, next_states, rewards):
        pass

    @staticmethod
    def check(cfg: dict):
        """Stop before any work where the family has no expert policy."""
        if envs.expert(cfg, []) is None:
            raise ConfigError(f"alg=NoisyExpert needs an expert policy, and env={cfg['env']} has none; use alg=PPO")
