"""Environment families (one module each, registered by name) and the facts the rest of the
toolkit reads about the one a config names: its task list, the train/val/test split,
optimal returns, actions, states and what the source learners and the model make of them.

Everything here is a pure function of the config, so collection, training and evaluation
agree on which task index is which goal and which tasks are held out. Nothing outside
env/ names a family.
"""
import importlib
import math
import pkgutil

import gymnasium as gym
import numpy as np

from env.family import FAMILIES, Family, register  # noqa: F401  (register: the families' entry point)


def family(cfg: dict) -> Family:
    return FAMILIES[cfg["env"]]  # the config loader has checked the name


def task_list(cfg: dict) -> list[dict]:
    """The tasks in use, indexed as in the datasets (all of the family's, or `max_tasks` of them)."""
    return family(cfg).task_list(cfg)


def task_split(cfg: dict) -> list[str]:
    """'train', 'val' or 'test' for each task index (see Family.split)."""
    return family(cfg).split(cfg)


def tasks_of_split(cfg: dict, which: str) -> list[int]:
    split = task_split(cfg)
    return [i for i, s in enumerate(split) if which == "all" or s == which]


def optimal_return(cfg: dict, task: dict) -> float:
    return family(cfg).optimal_return(cfg, task)


def n_actions(cfg: dict) -> int:
    return family(cfg).n_actions(cfg)


def observation_space(cfg: dict) -> gym.spaces.Space:
    return family(cfg).observation_space(cfg)


def state_dim(cfg: dict) -> int:
    """Numbers per recorded state (the datasets' `states (T, S, state_dim)`)."""
    return int(observation_space(cfg).shape[0])


def state_cardinalities(cfg: dict) -> list[int] | None:
    """Per-coordinate sizes of a discrete (MultiDiscrete) state; None for a continuous one."""
    space = observation_space(cfg)
    return space.nvec.tolist() if isinstance(space, gym.spaces.MultiDiscrete) else None


def n_state_tokens(cfg: dict) -> int:
    return math.prod(state_cardinalities(cfg))


def model_inputs(cfg: dict) -> dict:
    """What the model embeds: n_actions, and the state's cardinalities (discrete: embedded by
    index) or its size (continuous: a learned linear projection)."""
    cards = state_cardinalities(cfg)
    if cards is None:
        return {"n_actions": n_actions(cfg), "state_dim": state_dim(cfg)}
    return {"n_actions": n_actions(cfg), "state_cardinalities": cards}


def state_token(cfg: dict, states: np.ndarray) -> np.ndarray:
    """(..., state_dim) env states -> what a token carries: a discrete state's int64
    mixed-radix index in [0, n_state_tokens) (the model embeds it per cell or per
    coordinate, config key state_embedding), or a continuous state's float32 vector."""
    cards = state_cardinalities(cfg)
    if cards is None:
        return np.asarray(states, dtype=np.float32)
    index = np.zeros(states.shape[:-1], dtype=np.int64)
    for d, card in enumerate(cards):
        index = index * card + states[..., d].astype(np.int64)
    return index




def make_gym_env(cfg: dict, task: dict) -> gym.Env:
    f = family(cfg)
    return gym.make(f.gym_id, **f.gym_kwargs(cfg), **task, disable_env_checker=True)


def expert(cfg: dict, tasks: list[dict]):
    """The family's optimal policy for these tasks: states (N, state_dim) -> actions (N,)."""
    return family(cfg).expert(cfg, tasks)


def make_batched_env(cfg: dict, tasks: list[dict], seed: int | None = None):
    """One numpy env stepping one copy of each given task (repeat tasks for more copies);
    `seed` seeds a stochastic family's env (one with a `seed` method, e.g. the bandit)."""
    batched = family(cfg).make_batched_env(cfg, tasks)
    if seed is not None and hasattr(batched, "seed"):
        batched.seed(seed)
    return batched


# every module of env/ is imported, and each family module registers itself: adding a family
# is adding its module
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

GYM_IDS = {name: f.gym_id for name, f in FAMILIES.items()}  # the built-in families' gym ids
