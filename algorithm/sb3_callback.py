"""Recording learning histories from Stable-Baselines3 PPO."""
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from algorithm.history import compress_markers


class HistoryLoggerCallback(BaseCallback):
    """Records every transition of every stream while SB3 PPO learns.

    SB3 calls `_on_step` after `env.step` and before it overwrites `_last_obs`, so
    `_last_obs` is the state the action was taken in. The vec env auto-resets finished
    episodes; the true last next state is in `infos[i]["terminal_observation"]`.
    """

    def __init__(self, n_steps: int):
        super().__init__()
        self.n_steps = n_steps
        self.states, self.actions, self.rewards, self.next_states, self.dones = [], [], [], [], []

    def _on_step(self) -> bool:
        new_obs, dones, infos = self.locals["new_obs"], self.locals["dones"], self.locals["infos"]
        next_states = np.array(new_obs, dtype=np.float32, copy=True)
        for i, done in enumerate(dones):
            if done:
                next_states[i] = infos[i]["terminal_observation"]
        self.states.append(np.array(self.model._last_obs, dtype=np.float32))
        self.actions.append(np.array(self.locals["actions"]).reshape(-1))
        self.rewards.append(np.array(self.locals["rewards"], dtype=np.float32))
        self.next_states.append(next_states)
        self.dones.append(np.array(dones, dtype=bool))
        return True

    def history(self) -> dict:
        h = {"states": np.stack(self.states), "actions": np.stack(self.actions),
             "rewards": np.stack(self.rewards), "next_states": np.stack(self.next_states),
             "dones": np.stack(self.dones)}
        T, S = h["actions"].shape
        h["compress_markers"] = compress_markers(T, self.n_steps, S)
        return h
