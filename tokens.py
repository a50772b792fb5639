"""The one token builder: how an environment step becomes a model token, for training
(dataset.py reads it off a recorded history) and for rollouts (model/rollout.py builds it
step by step). Both call `step_tokens`, so the model sees the same token for the same step
in both places (tests/test_tokens.py replays a recorded rollout through the dataset path).

One token per environment step t embeds what the agent knows when it must act: the state
s_t (as the environment family encodes it for the model: an index, or a float vector), the
previous action a_{t-1} (`n_actions` = none), the previous reward r_{t-1} and whether s_t
starts a new episode. Arrays of any leading shape; numpy only, no torch.
"""
import numpy as np

import env as envs

KIND_STEP, KIND_START, KIND_END = 0, 1, 2  # token kinds; markers are <compress>, </compress>
IGNORE = -100  # target value that the losses skip
TOKEN_FIELDS = ("kind", "state", "prev_action", "prev_reward", "new_episode")  # what the model reads
TARGET_FIELDS = ("action", "next_kind")  # what it is trained to predict


def step_tokens(state, prev_action, prev_reward, new_episode) -> dict:
    """Tokens of steps: `state` is the family's state token (see env.state_token)."""
    prev_action = np.asarray(prev_action).astype(np.int64)
    return {"kind": np.full(prev_action.shape, KIND_STEP, dtype=np.int64),
            "state": np.asarray(state),
            "prev_action": prev_action,
            "prev_reward": np.asarray(prev_reward).astype(np.float32),
            "new_episode": np.asarray(new_episode).astype(np.int64)}


def previous_step(actions, rewards, dones, starts_history: bool, n_actions: int):
    """(prev_action, prev_reward, new_episode) of steps [a, b) of a history, given the
    actions, rewards and dones of steps [a - 1, b) (of [0, b) when a == 0, where the very
    first step has no previous step: no action, reward 0, a new episode)."""
    actions, rewards, dones = np.asarray(actions), np.asarray(rewards), np.asarray(dones)
    if starts_history:
        return (np.concatenate([[n_actions], actions[:-1]]), np.concatenate([[0.0], rewards[:-1]]),
                np.concatenate([[1], dones[:-1]]))
    return actions[:-1], rewards[:-1], dones[:-1]


def with_targets(tokens: dict, action) -> dict:
    """Training tokens: the step's own action is its target; the next token is a step."""
    action = np.asarray(action).astype(np.int64)
    return tokens | {"action": action, "next_kind": np.full(action.shape, KIND_STEP, dtype=np.int64)}


def marker_token(kind: int, next_kind: int = IGNORE) -> dict:
    """One <compress> / </compress> token (no state, no action target)."""
    return {"kind": np.array([kind]), "state": np.array([0]), "prev_action": np.array([0]),
            "prev_reward": np.array([0.0], dtype=np.float32), "new_episode": np.array([0]),
            "action": np.array([IGNORE]), "next_kind": np.array([next_kind])}


def concat_tokens(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def window_tokens(cfg: dict, stream: dict, a: int, b: int) -> dict:
    """Tokens of steps [a, b) of one recorded stream ({field: (T, ...) array-like}), with
    targets: the training side of `step_tokens`."""
    lo = max(a - 1, 0)  # one step earlier for the previous action/reward/done
    actions = np.asarray(stream["actions"][lo:b]).astype(np.int64)
    prev = previous_step(actions, stream["rewards"][lo:b], stream["dones"][lo:b], a == 0, envs.n_actions(cfg))
    state = envs.state_token(cfg, np.asarray(stream["states"][a:b]))
    return with_targets(step_tokens(state, *prev), actions[-(b - a):])


def region_tokens(cfg: dict, stream: dict, a: int, b: int) -> list[dict]:
    """[<compress>, steps a..b-1, </compress>] with token-type targets (next token's kind)."""
    steps = window_tokens(cfg, stream, a, b)
    steps["next_kind"][-1] = KIND_END
    return [marker_token(KIND_START, KIND_STEP), steps, marker_token(KIND_END, KIND_START)]
