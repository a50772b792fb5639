"""Environment families, their task lists, the train/test split and optimal returns.

Everything here is a pure function of the config, so collection, training and evaluation
agree on which task index is which goal and which tasks are held out.
"""
import gymnasium as gym
import numpy as np

from env import dark_key_to_door, darkroom
from env.dark_key_to_door import BatchedDarkKeyToDoor, DarkKeyToDoorEnv
from env.darkroom import BatchedDarkroom, DarkroomEnv

GYM_IDS = {"darkroom": "Darkroom-v0", "dark_key_to_door": "DarkKeyToDoor-v0"}
_FAMILIES = {"darkroom": darkroom, "dark_key_to_door": dark_key_to_door}

for _name, _cls in (("Darkroom-v0", DarkroomEnv), ("DarkKeyToDoor-v0", DarkKeyToDoorEnv)):
    if _name not in gym.registry:
        gym.register(_name, entry_point=_cls)


def task_list(cfg: dict) -> list[dict]:
    return _FAMILIES[cfg["env"]].tasks(cfg["grid_size"])


def task_split(cfg: dict) -> list[str]:
    """'train', 'val' or 'test' for each task index; depends only on env_split_seed and the ratios.

    The test tasks are the tail of a seeded permutation (`1 - train_env_ratio` of all tasks);
    the validation tasks are taken from the end of the rest (`val_env_ratio` of all tasks), so
    adding a validation split never changes which tasks are test tasks. Training sees neither:
    every choice (temperature, budgets, steps) is made on `val`, `test` is only reported."""
    n = len(task_list(cfg))
    order = np.random.default_rng(cfg["env_split_seed"]).permutation(n)
    n_train = int(round(cfg["train_env_ratio"] * n))
    n_val = min(int(round(cfg["val_env_ratio"] * n)), n_train)
    split = np.full(n, "test", dtype=object)
    split[order[:n_train - n_val]] = "train"
    split[order[n_train - n_val:n_train]] = "val"
    return split.tolist()


def tasks_of_split(cfg: dict, which: str) -> list[int]:
    split = task_split(cfg)
    return [i for i, s in enumerate(split) if which == "all" or s == which]


def optimal_return(cfg: dict, task: dict) -> float:
    return _FAMILIES[cfg["env"]].optimal_return(task, cfg["grid_size"], cfg["horizon"])


def state_dim(cfg: dict) -> int:
    return {"darkroom": 2, "dark_key_to_door": 3}[cfg["env"]]


def n_actions(cfg: dict) -> int:
    return darkroom.N_ACTIONS


def make_gym_env(cfg: dict, task: dict) -> gym.Env:
    return gym.make(GYM_IDS[cfg["env"]], grid_size=cfg["grid_size"], horizon=cfg["horizon"], **task,
                    disable_env_checker=True)


def make_batched_env(cfg: dict, tasks: list[dict]):
    """One numpy env stepping one copy of each given task (repeat tasks for more copies)."""
    if cfg["env"] == "darkroom":
        return BatchedDarkroom([t["goal"] for t in tasks], cfg["grid_size"], cfg["horizon"])
    return BatchedDarkKeyToDoor([t["key"] for t in tasks], [t["door"] for t in tasks],
                                cfg["grid_size"], cfg["horizon"])


def state_cardinalities(cfg: dict) -> list[int]:
    g = cfg["grid_size"]
    return {"darkroom": [g, g], "dark_key_to_door": [g, g, 2]}[cfg["env"]]


def n_state_tokens(cfg: dict) -> int:
    return int(np.prod(state_cardinalities(cfg)))


def state_index(cfg: dict, states: np.ndarray) -> np.ndarray:
    """(..., state_dim) grid states -> (...) int64 mixed-radix index in [0, n_state_tokens);
    the model embeds it per cell or per coordinate (config key state_embedding)."""
    index = np.zeros(states.shape[:-1], dtype=np.int64)
    for d, card in enumerate(state_cardinalities(cfg)):
        index = index * card + states[..., d].astype(np.int64)
    return index
