"""Multi-armed Bernoulli bandits: one pull per episode (horizon 1).

A task is the arms' success probabilities; pulling arm a pays 1 with probability means[a],
else 0. There is one state (the observation is always [0]): everything the agent can know
about the task is in the rewards of its earlier pulls, so a learner that improves over a
stream of pulls is learning from its history -- in-context learning for AD, and the setting
of the AD, DPT and Headless-AD papers' bandit experiments.

The task list is a fixed, seeded list of `bandit_tasks` tasks of `n_arms` arms: means drawn
uniformly from [0, 1], redrawn while the best arm beats the second-best by less than
`bandit_min_gap`. Why a gap: with a tiny gap every policy is near-optimal, so regret and
"% of optimal" say nothing; with the gap at least 0.1 the best arm can be told apart within
a few hundred pulls (the regret scale of UCB1 is about sum over arms of log(T) / gap).

Rewards are random, so the batched env takes a seed (`seed(s)`): each copy draws from its own
generator, seeded by (s, the task's means, how many copies of the same task come before it),
so a copy's rewards do not depend on which other tasks share the batch (the sources'
chunk independence) and a rerun gives the same numbers.
"""
import math

import gymnasium as gym
import numpy as np

from config.schema import add_keys
from env.family import MAX_TASKS, Family, register
from errors import ConfigError

add_keys("env", family="bandit",
         n_arms=(int, 5, "bandit: arms per task (actions)", {"min": 2}),
         bandit_tasks=(int, 500, "bandit: tasks in the family's fixed, seeded task list", {"min": 1}),
         bandit_min_gap=(float, 0.1, "bandit: every task's best arm beats its second-best by at least this "
                         "(so that regret measures finding the best arm)", {"min": 0.0, "max": 1.0}))

TASK_SEED = 20240611  # the task list is fixed: a function of n_arms, bandit_tasks and bandit_min_gap only


# the most uniform numbers the task draw may take on average (about half a second); settings that would need more
# on average are refused with the gap that works, so the draw never runs on unseen
DRAW_BUDGET = 10_000_000


def acceptance(n_arms: int, min_gap: float) -> float:
    """The chance that a draw of n_arms uniform means has its best arm min_gap above the
    second best: (1 - gap)^n_arms (the top spacing of n uniforms), in logs so it never underflows."""
    return math.exp(n_arms * math.log1p(-min(min_gap, 1.0 - 1e-12)))


def expected_draw(n_tasks: int, n_arms: int, min_gap: float) -> float:
    """Uniform numbers the draw of n_tasks tasks takes on average."""
    return n_tasks * n_arms / max(acceptance(n_arms, min_gap), 1e-300)


def largest_gap(n_tasks: int, n_arms: int) -> float:
    """The largest bandit_min_gap whose draw fits DRAW_BUDGET (0 or below: none does)."""
    need = n_tasks * n_arms / DRAW_BUDGET
    return 1.0 - need ** (1.0 / n_arms) if need <= 1 else 0.0


def draw_tasks(n_tasks: int, n_arms: int, min_gap: float) -> list[list[float]]:
    """Arm means, uniform in [0, 1] rounded to 3 decimals (exact in JSON), redrawn until the gap
    holds. Drawn in blocks of rows (one generator stream, so the same list as one row at a
    time), and never more than a few times the budget: a ConfigError, not a hang."""
    if min_gap > 1.0 - 1e-3:
        raise ConfigError(f"bandit_min_gap={min_gap} leaves no task (means lie in [0, 1]); use a gap below 0.9")
    rng = np.random.default_rng(TASK_SEED)
    tasks: list[list[float]] = []
    drawn = 0
    rows = max(1, min(100_000, 1_000_000 // n_arms))
    while len(tasks) < n_tasks:
        if drawn > 3 * DRAW_BUDGET:
            raise ConfigError(f"bandit_min_gap={min_gap} with n_arms={n_arms}: no {n_tasks} tasks found in "
                              f"{drawn:,} draws; use bandit_min_gap <= {0.99 * largest_gap(n_tasks, n_arms):.2g}")
        means = np.round(rng.random((rows, n_arms)), 3)
        drawn += means.size
        top2 = np.partition(means, n_arms - 2, axis=1)[:, -2:]  # [second best, best]
        ok = top2[:, -1] - top2[:, -2] >= min_gap - 1e-9
        tasks.extend(means[ok][:n_tasks - len(tasks)].tolist())
    return tasks


def copy_generators(seed: int, means: np.ndarray) -> list[np.random.Generator]:
    """One generator per copy: (seed, the copy's task, its occurrence among copies of that task)."""
    seen: dict[tuple, int] = {}
    gens = []
    for m in means:
        key = tuple(int(round(x * 1000)) for x in m)
        k = seen.get(key, 0)
        seen[key] = k + 1
        gens.append(np.random.default_rng([seed, k, *key]))
    return gens


class BanditEnv(gym.Env):
    """One bandit task as a gymnasium env (the sb3 backend and the tests)."""
    metadata = {"render_modes": []}

    def __init__(self, means=(0.5, 0.5), horizon: int = 1):
        self.means, self.horizon = np.asarray(means, dtype=np.float64), horizon
        self.observation_space = gym.spaces.MultiDiscrete([1])
        self.action_space = gym.spaces.Discrete(len(self.means))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, dtype=np.int64), {}

    def step(self, action):
        reward = float(self.np_random.random() < self.means[int(action)])
        self.t += 1
        return np.zeros(1, dtype=np.int64), reward, False, self.t >= self.horizon, {}


class BatchedBandit:
    """Many bandit copies pulled at once; a copy's reward is 1 when its generator's next
    uniform is below the pulled arm's mean."""

    def __init__(self, means, horizon: int = 1, seed: int = 0):
        self.means = np.asarray(means, dtype=np.float64)
        self.n, self.horizon = len(self.means), horizon
        self.seed(seed)

    def seed(self, seed: int):
        self.generators = copy_generators(seed, self.means)

    def reset(self) -> np.ndarray:
        self.t = 0
        return np.zeros((self.n, 1), dtype=np.int64)

    def step(self, actions):
        uniforms = np.array([g.random() for g in self.generators])
        rewards = (uniforms < self.means[np.arange(self.n), np.asarray(actions)]).astype(np.float32)
        self.t += 1
        return np.zeros((self.n, 1), dtype=np.int64), rewards, np.full(self.n, self.t >= self.horizon)


class Bandit(Family):
    name, gym_id, gym_class = "bandit", "BernoulliBandit-v0", BanditEnv
    size_keys = ("bandit_tasks",)

    def n_tasks(self, cfg):
        return cfg["bandit_tasks"]

    def size_hint(self, cfg):
        return f"use bandit_tasks <= {MAX_TASKS:,}"

    def check_config(self, cfg):
        if cfg["horizon"] != 1:
            raise ConfigError(f"env=bandit has one pull per episode: set horizon=1 (got {cfg['horizon']})")
        n, arms, gap = cfg["bandit_tasks"], cfg["n_arms"], cfg["bandit_min_gap"]
        most = DRAW_BUDGET // 4  # arm means the task list may hold
        if n * arms > most:
            raise ConfigError(f"bandit_tasks={n} x n_arms={arms} = {n * arms:,} arm means is more than the "
                              f"{most:,} the task list may hold; use n_arms <= {max(2, most // n)} "
                              "or fewer bandit_tasks")
        if expected_draw(n, arms, gap) > DRAW_BUDGET:
            best = largest_gap(n, arms) * 0.99
            raise ConfigError(f"bandit_min_gap={gap} with n_arms={arms}: a draw of {arms} means has its best arm "
                              f"{gap} above the second with chance {acceptance(arms, gap):.1e}, so the {n} tasks "
                              f"would take about {expected_draw(n, arms, gap):.1e} draws; " +
                              (f"use bandit_min_gap <= {best:.2g} (or fewer n_arms)" if best > 0 else
                               "use fewer n_arms or bandit_tasks"))

    def tasks(self, cfg):
        return [{"means": m} for m in draw_tasks(cfg["bandit_tasks"], cfg["n_arms"], cfg["bandit_min_gap"])]

    def optimal_return(self, cfg, task):
        return float(max(task["means"]))  # always pulling the best arm

    def n_actions(self, cfg):
        return cfg["n_arms"]

    def observation_space(self, cfg):
        return gym.spaces.MultiDiscrete([1])  # one state

    def make_batched_env(self, cfg, tasks):
        return BatchedBandit([t["means"] for t in tasks], cfg["horizon"])  # seeded by env.make_batched_env

    def gym_kwargs(self, cfg):
        return {"horizon": cfg["horizon"]}


register(Bandit())
