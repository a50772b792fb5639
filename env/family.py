"""What an environment family declares. A family is one module under env/ that subclasses
`Family` and registers an instance (`register`, below); collection, training, evaluation and
the sources read every fact about it through the functions of env/__init__.py, so
adding a family touches no other file (docs/extending.md; tests/test_extending.py adds one
from a test file). The config's `env` key names the family.
"""
import gymnasium as gym
import numpy as np

from config.schema import FAMILIES
from errors import ConfigError

# The most tasks a family's task list may hold: the list is built in memory whenever a config
# is checked (the split), and written into every dataset's header; 100,000 small tasks build
# in well under a second. A family's size keys are refused above it before anything is built.
MAX_TASKS = 100_000


class Family:
    """One environment family: its tasks, their split, optimal returns, observation space
    and a batched numpy env; everything else (what PPO one-hot encodes, what the model
    embeds, the state token) follows from the observation space."""
    name = ""         # the config's `env` value
    gym_id = None     # gymnasium id of the one-task env (sb3 backend, tests), registered on `register`
    gym_class = None  # its class: gym_class(**gym_kwargs(cfg), **task)
    # What a source other than PPO needs, for the families that offer it: `expert` (alg NoisyExpert)
    # below, and a class attribute `hidden_cells` (alg PosteriorSampling: the number of grid
    # cells that hide the reward, found in order, and `step_toward(pos, target)`, the shortest-path
    # action; see env/darkroom.py) and, for alg QLearning, whether the family pays once per hidden
    # cell (`pays_once_per_hidden_cell`, Dark Key-to-Door).
    size_keys: tuple = ()  # the config keys that set how many tasks the family has (named in messages)

    def check(self, cfg: dict):
        """Every check of a config against the family, quick whatever the values: the size
        of the task list first (nothing may build a list too large to hold), then the
        family's own `check_config`. Called when a config is loaded, before any work."""
        n = self.n_tasks(cfg)
        if n is not None and n > MAX_TASKS:
            now = ", ".join(f"{k}={cfg[k]}" for k in self.size_keys) or f"env={cfg['env']}"
            raise ConfigError(f"{now} gives {n:,} tasks, more than the {MAX_TASKS:,} a task list may hold (it is "
                              f"built in memory at every start: about {n * 500 / 1e9:.1f} GB); "
                              f"{self.size_hint(cfg) or 'use fewer tasks'}")
        self.check_config(cfg)

    def n_tasks(self, cfg: dict) -> int | None:
        """How many tasks `tasks(cfg)` gives, computed without building them (None: unknown,
        then the family itself must keep its size keys bounded)."""
        return None

    def size_hint(self, cfg: dict) -> str:
        """What to set for a task list of at most MAX_TASKS tasks, e.g. 'use grid_size <= 17'."""
        return ""

    def check_config(self, cfg: dict):
        """Raise ConfigError (one line naming the key and what is allowed) for settings the
        family cannot run with; called by `check` when a config is loaded, before any work.
        It must return within a second for every allowed value: a draw loop needs a bound
        (or a refusal of the values that would make it run on)."""

    def tasks(self, cfg: dict) -> list[dict]:
        """Every task of the family at these settings, in a fixed order (a JSON-able dict each)."""
        raise NotImplementedError

    def task_list(self, cfg: dict) -> list[dict]:
        """The tasks in use: all of `tasks(cfg)`, or with `max_tasks` a seeded subset of them
        (kept in their order; a pure function of env_split_seed), so a family of thousands
        of tasks (Dark Key-to-Door 9x9: 6,561) can be collected at the size a study needs."""
        tasks = self.tasks(cfg)
        if not cfg.get("max_tasks") or cfg["max_tasks"] >= len(tasks):
            return tasks
        rng = np.random.default_rng([cfg["env_split_seed"], 1])  # not the split's stream
        keep = np.sort(rng.permutation(len(tasks))[:cfg["max_tasks"]])
        return [tasks[i] for i in keep]

    def split(self, cfg: dict) -> list[str]:
        """'train', 'val' or 'test' for each task index; depends only on env_split_seed and the
        ratios. The test tasks are the tail of a seeded permutation (`1 - train_env_ratio` of
        all tasks); the validation tasks are taken from the end of the rest (`val_env_ratio`
        of all tasks), so adding a validation split never changes which tasks are test tasks."""
        n = len(self.task_list(cfg))
        order = np.random.default_rng(cfg["env_split_seed"]).permutation(n)
        n_train = int(round(cfg["train_env_ratio"] * n))
        n_val = min(int(round(cfg["val_env_ratio"] * n)), n_train)
        split = np.full(n, "test", dtype=object)
        split[order[:n_train - n_val]] = "train"
        split[order[n_train - n_val:n_train]] = "val"
        return split.tolist()

    def optimal_return(self, cfg: dict, task: dict) -> float:
        """The best expected return of one episode of `task`."""
        raise NotImplementedError

    def n_actions(self, cfg: dict) -> int:
        raise NotImplementedError

    def observation_space(self, cfg: dict) -> gym.spaces.Space:
        """MultiDiscrete (a grid: PPO one-hot encodes each coordinate, the model embeds the
        state by index) or Box (continuous: PPO and the model read the floats)."""
        raise NotImplementedError

    def make_batched_env(self, cfg: dict, tasks: list[dict]):
        """One numpy env stepping one copy of each task: reset() -> states (N, state_dim);
        step(actions (N,)) -> (states, rewards (N,) float32, dones (N,) bool). All copies
        share one clock: after `horizon` steps all are done and the caller calls reset().
        A family with random dynamics gives the env a `seed(seed)` method: collection seeds it
        with alg_seed, rollouts with eval_seed (env.make_batched_env)."""
        raise NotImplementedError

    def expert(self, cfg: dict, tasks: list[dict]):
        """An optimal policy that knows the tasks: a function from the batched env's states
        (N, state_dim), one task per row, to actions (N,). Only `alg: NoisyExpert` collection
        needs it; None where the family has none."""
        return None

    def gym_kwargs(self, cfg: dict) -> dict:
        """Keyword arguments of gym_class besides the task's."""
        return {"horizon": cfg["horizon"]}


def register(family: Family) -> Family:
    """Make `family` available as `env: <family.name>` in configs (and its gym env by id)."""
    FAMILIES[family.name] = family
    if family.gym_id and family.gym_id not in gym.registry:
        gym.register(family.gym_id, entry_point=family.gym_class)
    return family
