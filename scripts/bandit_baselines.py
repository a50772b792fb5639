"""Cumulative regret on the bandit family: evaluated AD runs against UCB1, Thompson sampling
and the source PPO, on the same held-out tasks.

    python scripts/bandit_baselines.py runs/AD-bandit-seed0 runs/bandit_short/AD-bandit-seed0
    python scripts/bandit_baselines.py runs/AD-bandit-seed0 runs/AD-bandit-seed1 --label AD-150 AD-150 ...

Regret after T pulls is sum over t < T of (best arm's mean - reward of pull t), the realised
rewards of every method (AD: eval_result.npy; PPO: the dataset's test-task streams), averaged
over tasks x rollouts. UCB1 and Thompson run here, in the batched bandit env seeded with the
runs' eval_seed, so copy r of a task draws the same uniforms as AD's rollout r (paired
comparison). Runs given the same --label are pooled (seeds). The 95% interval is a
bootstrap over tasks of the per-task mean regret.
"""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import env as envs
from algorithm.history import dataset_path
from cli import ArgumentParser, load_config, run_cli
from errors import UserError
from files import atomic_write, check_output_path
from report import load_evaluation, percent

BOOTSTRAP_REPS = 2000


# ----------------------------------------------------------------------------- baselines

def ucb1(env, n_arms: int, n_pulls: int) -> np.ndarray:
    """UCB1 (Auer et al. 2002): each arm once, then argmax of mean + sqrt(2 ln t / n_a),
    t the pulls so far (ties: the lowest arm). Returns rewards (copies, n_pulls)."""
    n, rewards = env.n, np.zeros((env.n, n_pulls), dtype=np.float32)
    pulls, wins = np.zeros((n, n_arms)), np.zeros((n, n_arms))
    for t in range(n_pulls):
        env.reset()
        if t < n_arms:
            actions = np.full(n, t)
        else:
            actions = np.argmax(wins / pulls + np.sqrt(2.0 * np.log(t) / pulls), axis=1)
        rewards[:, t] = _pull(env, actions, pulls, wins)
    return rewards


def thompson(env, n_arms: int, n_pulls: int, seed: int) -> np.ndarray:
    """Thompson sampling with Beta(1, 1) priors: pull the arm whose posterior draw is largest."""
    rng = np.random.default_rng([seed, 1])  # not the env's streams
    n, rewards = env.n, np.zeros((env.n, n_pulls), dtype=np.float32)
    pulls, wins = np.zeros((n, n_arms)), np.zeros((n, n_arms))
    for t in range(n_pulls):
        env.reset()
        actions = np.argmax(rng.beta(1.0 + wins, 1.0 + pulls - wins), axis=1)
        rewards[:, t] = _pull(env, actions, pulls, wins)
    return rewards


def _pull(env, actions, pulls, wins) -> np.ndarray:
    """One pull in every copy; updates the counts in place."""
    _, r, _ = env.step(actions)
    rows = np.arange(len(actions))
    pulls[rows, actions] += 1
    wins[rows, actions] += r
    return r


def run_baseline(cfg: dict, task_indices: list[int], n_rollouts: int, n_pulls: int, name: str) -> np.ndarray:
    """Rewards (tasks x rollouts, n_pulls), rows task-major as in eval_result.npy."""
    tasks = envs.task_list(cfg)
    batch = [tasks[i] for i in task_indices for _ in range(n_rollouts)]
    env = envs.make_batched_env(cfg, batch, seed=cfg["eval_seed"])
    if name == "UCB1":
        return ucb1(env, cfg["n_arms"], n_pulls)
    return thompson(env, cfg["n_arms"], n_pulls, cfg["eval_seed"])


def ppo_rewards(cfg: dict, task_indices: list[int], n_pulls: int) -> np.ndarray | None:
    """The source PPO's rewards on these tasks, one row per (task, stream), or None without data."""
    import h5py
    path = dataset_path(cfg)
    if not path.is_file():
        return None
    rows = []
    with h5py.File(path, "r") as f:
        for i in task_indices:
            r = f[str(i)]["rewards"][:n_pulls]  # (T, S)
            if len(r) < n_pulls:
                return None
            rows.append(r.T)
    return np.concatenate(rows, 0)


# ----------------------------------------------------------------------------- regret

def cumulative_regret(rewards: np.ndarray, best: np.ndarray) -> np.ndarray:
    """(rows, T) rewards and (rows,) best means -> (rows, T) regret after 1..T pulls."""
    return np.cumsum(best[:, None] - rewards, axis=1)


def per_task_mean(values: np.ndarray, n_tasks: int) -> np.ndarray:
    """(tasks x k rows, task-major) -> (tasks,) mean of each task's rows."""
    return values.reshape(n_tasks, -1).mean(1)


def bootstrap_ci(per_task: np.ndarray, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = per_task[rng.integers(0, len(per_task), (BOOTSTRAP_REPS, len(per_task)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def regret_row(label: str, rewards: np.ndarray, best: np.ndarray, n_tasks: int, checkpoints: list[int]) -> dict:
    regret = cumulative_regret(rewards, best)
    cells = {}
    for T in checkpoints:
        per_task = per_task_mean(regret[:, T - 1], n_tasks)
        cells[T] = (float(per_task.mean()), *bootstrap_ci(per_task))
    final = per_task_mean(rewards[:, -10:].mean(1) / best, n_tasks)  # last 10 pulls, fraction of the best mean
    return {"label": label, "regret": cells, "rows": len(rewards), "final_fraction": float(final.mean())}


def table(rows: list[dict], checkpoints: list[int]) -> str:
    head = "| method | rows | " + " | ".join(f"regret @{T} [95% CI]" for T in checkpoints) + \
           " | last 10 pulls, % of best arm |"
    lines = [head, "|---|---|" + "---|" * (len(checkpoints) + 1)]
    for r in rows:
        cells = " | ".join(f"{m:.1f} [{lo:.1f}, {hi:.1f}]" for m, lo, hi in (r["regret"][T] for T in checkpoints))
        lines.append(f"| {r['label']} | {r['rows']} | {cells} | {percent(r['final_fraction'])} |")
    return "\n".join(lines)


def load_eval(run: Path, tag: str) -> tuple[dict, dict, np.ndarray]:
    summary, returns = load_evaluation(run, tag)
    cfg = load_config([run / "config.yaml"], {})
    if cfg["env"] != "bandit":
        raise UserError(f"{run} is a run on env={cfg['env']}; this script compares bandit runs")
    return cfg, summary, returns


def compare(runs: list[Path], labels: list[str], tag: str = "", checkpoints=None) -> tuple[str, list[dict]]:
    """The regret table of these evaluated runs (pooled by label) and the three baselines."""
    loaded = [load_eval(run, tag) for run in runs]
    cfg, first, _ = loaded[0]
    for run, (_, s, _) in zip(runs[1:], loaded[1:]):
        if s["task_indices"] != first["task_indices"] or s["n_episodes"] != first["n_episodes"]:
            raise UserError(f"{run} was evaluated on other tasks or pulls than {runs[0]}; evaluate both alike")
    task_indices = list(dict.fromkeys(first["task_indices"]))
    n_tasks, n_rollouts, n_pulls = len(task_indices), first["n_rollouts"], first["n_episodes"]
    checkpoints = sorted({T for T in (checkpoints or (10, 50, 100, n_pulls)) if T <= n_pulls})
    best_of = lambda k: np.repeat(np.array(first["optimal_return"][::n_rollouts]), k)  # noqa: E731 - per task
    rows = []
    for label in dict.fromkeys(labels):  # pooled runs of one label: seeds, rows stacked per task
        parts = [r.reshape(n_tasks, n_rollouts, -1) for (_, _, r), lab in zip(loaded, labels) if lab == label]
        rewards = np.concatenate(parts, 1).reshape(n_tasks * n_rollouts * len(parts), -1)
        rows.append(regret_row(label, rewards, best_of(n_rollouts * len(parts)), n_tasks, checkpoints))
    for name in ("UCB1", "Thompson"):
        rows.append(regret_row(name, run_baseline(cfg, task_indices, n_rollouts, n_pulls, name),
                               best_of(n_rollouts), n_tasks, checkpoints))
    ppo = ppo_rewards(cfg, task_indices, n_pulls)
    if ppo is not None:
        rows.append(regret_row(f"source PPO ({describe_learners(cfg)})", ppo,
                               best_of(cfg["n_stream"]), n_tasks, checkpoints))
    rows.append(regret_row("uniform random", _random_rewards(cfg, task_indices, n_rollouts, n_pulls),
                           best_of(n_rollouts), n_tasks, checkpoints))
    return table(rows, checkpoints), rows


def describe_learners(cfg: dict) -> str:
    """How the source PPO's streams of a task were trained: one shared learner, or several."""
    streams, learners = cfg["n_stream"], cfg.get("learners_per_task", 1)
    if learners == 1:
        return f"{streams} streams share one learner"
    if learners == streams:
        return f"{streams} streams, one learner each"
    return f"{streams} streams, {learners} learners of {streams // learners}"


def _random_rewards(cfg, task_indices, n_rollouts, n_pulls) -> np.ndarray:
    """Expected reward of a uniformly random arm (the regret of not learning at all)."""
    tasks = envs.task_list(cfg)
    mean = np.array([np.mean(tasks[i]["means"]) for i in task_indices for _ in range(n_rollouts)])
    return np.repeat(mean[:, None], n_pulls, axis=1).astype(np.float32)


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="evaluated bandit run directories (evaluate.py)")
    p.add_argument("--label", nargs="+", help="a row name per run (runs with the same label are pooled); "
                   "default: the run directory")
    p.add_argument("--tag", default="", help="read eval_summary_TAG.json (an evaluate.py --tag)")
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = p.parse_args()
    labels = args.label or [str(r) for r in args.runs]
    if len(labels) != len(args.runs):
        raise UserError(f"--label: give one label per run ({len(args.runs)} runs, {len(labels)} labels)")
    if args.out:  # checked before the baselines run, not after
        check_output_path(args.out)
    text, _ = compare(args.runs, labels, args.tag)
    print(text)
    if args.out:
        with atomic_write(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    run_cli(main)
