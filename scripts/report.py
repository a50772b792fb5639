"""Aggregate scores the way RL papers report them: the interquartile mean (IQM) with a
stratified-bootstrap 95% confidence interval (Agarwal et al. 2021, the `rliable` package).

A score matrix has one row per independent run and one column per task. Here a run is one
(training seed, evaluation rollout) pair: each rollout is an independent in-context
learning episode sequence on its task, so seeds x rollouts rows are resampled within each
task (stratified by task).
"""
import json
import warnings
from pathlib import Path

import numpy as np

from errors import UserError

BOOTSTRAP_REPS = 2000  # enough for a 2-decimal interval; rliable's default (50k) takes minutes


def iqm_with_ci(scores: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(IQM, CI low, CI high) of a (runs, tasks) score matrix; the same numbers for the
    same scores and seed, whatever else has drawn random numbers in this process."""
    from rliable import library as rly
    from rliable import metrics
    scores = np.asarray(scores, dtype=np.float64)
    # rliable's StratifiedBootstrap draws its resamples from numpy's global RNG and ignores
    # the random_state it is given (rliable 1.2), so the interval moved between runs:
    # seed the global RNG for the call and give the caller's state back afterwards
    outer_state = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():  # arch's notice that it will prefer numpy Generators
            warnings.simplefilter("ignore", FutureWarning)
            point, interval = rly.get_interval_estimates(
                {"x": scores}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=BOOTSTRAP_REPS,
                random_state=np.random.RandomState(seed))
    finally:
        np.random.set_state(outer_state)
    return float(point["x"][0]), float(interval["x"][0, 0]), float(interval["x"][1, 0])


def load_training(run_dir: Path) -> dict:
    """train_summary.json of a run (steps, seconds, hardware), or a one-line UserError saying
    whether the run is missing, unfinished or its summary damaged."""
    path = Path(run_dir) / "train_summary.json"
    if not Path(run_dir).is_dir():
        raise UserError(f"run folder not found: {run_dir}; check the path")
    if not path.is_file():
        raise UserError(f"{run_dir} has not finished training (no {path.name}): rerun the same train.py command")
    try:
        summary = json.loads(path.read_text())
        float(summary["seconds"])
        return summary
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({str(e).splitlines()[0][:80]}); move it away and rerun "
                        "the same train.py command") from None


def evaluation_files(run_dir: Path, tag: str = "") -> tuple[Path, Path]:
    """(eval_summary, eval_result) paths of one evaluate.py run, tagged `tag` or untagged
    (the names evaluate.output_names gives; repeated here so reports need not import torch)."""
    suffix = f"_{tag}" if tag else ""
    return run_dir / f"eval_summary{suffix}.json", run_dir / f"eval_result{suffix}.npy"


def load_evaluation(run_dir: Path, tag: str = "") -> tuple[dict, np.ndarray]:
    """(eval_summary, eval_result returns) of one evaluate.py run of a run directory, tagged
    `tag` (evaluate.py --tag) or untagged: the one reader of evaluation outputs. Whatever is
    missing or damaged (a folder that is not there, an empty or truncated file, not JSON, a
    wrong shape, keys missing) is a one-line UserError naming the file and the fix."""
    run_dir = Path(run_dir)
    summary_path, returns_path = evaluation_files(run_dir, tag)
    rerun = f"evaluate.py {run_dir}{' --tag ' + tag if tag else ''}"
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}" + (" (a file, not a folder)" if run_dir.exists() else "")
                        + "; check the path")
    if not (summary_path.is_file() and returns_path.is_file()):
        unfinished = not (run_dir / "ckpt-last.pt").is_file()
        raise UserError(f"{run_dir} has no evaluation{' tagged ' + tag if tag else ''} ({returns_path.name})"
                        + ("; the run has no checkpoint yet: finish its training (train.py), then run " if unfinished
                           else "; run ") + f"{rerun} first")
    damaged = f"; rerun {rerun} to write it again"
    try:
        summary = json.loads(summary_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{summary_path} is damaged (not JSON: {str(e).splitlines()[0][:80]}){damaged}") from None
    problem = _summary_problem(summary)
    if problem:
        raise UserError(f"{summary_path} is damaged ({problem}){damaged}")
    try:
        returns = np.load(returns_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{returns_path} is damaged ({(str(e).splitlines() or [type(e).__name__])[0][:80]})"
                        f"{damaged}") from None
    n_tasks = len(summary["per_task"])
    rows = n_tasks * summary["n_rollouts"] if "n_rollouts" in summary else None
    wrong_rows = returns.ndim != 2 or (returns.shape[0] != rows if rows else returns.shape[0] % n_tasks)
    if wrong_rows or returns.shape[1] < 1 or returns.dtype.kind not in "fiu":
        rows = rows or f"a multiple of {n_tasks}"
        raise UserError(f"{returns_path} is damaged (shape {list(returns.shape)} {returns.dtype}, expected {rows} "
                        f"rows of episode returns for {summary_path.name}){damaged}")
    if "n_episodes" in summary and summary["n_episodes"] != returns.shape[1]:
        raise UserError(f"{returns_path} holds {returns.shape[1]} episodes and {summary_path.name} says "
                        f"{summary['n_episodes']}: they are from different evaluations{damaged}")
    return upgrade_summary(summary), returns


def _summary_problem(summary) -> str:
    """What is wrong with a loaded eval_summary, or '' (the keys every report reads)."""
    if not isinstance(summary, dict):
        return f"a {type(summary).__name__}, not a mapping"
    if "per_task" not in summary:
        return "key 'per_task' is missing"
    tasks = summary["per_task"]
    if (not isinstance(tasks, list) or not tasks
            or not all(isinstance(t, dict) and isinstance(t.get("optimal"), (int, float)) for t in tasks)):
        return "per_task is not a list of tasks with their optimal return"
    if not isinstance(summary.get("n_rollouts", 1), int) or summary.get("n_rollouts", 1) < 1:
        return f"n_rollouts is {summary['n_rollouts']!r}"
    return ""


# eval_summary keys under the names an earlier version of evaluate.py wrote them
RENAMED_SUMMARY_KEYS = {"ppo_episodes_to_80pct": "source_episodes_to_80pct"}


def upgrade_summary(summary: dict) -> dict:
    """An eval_summary.json with today's key names, also when an earlier version wrote it."""
    for old, new in RENAMED_SUMMARY_KEYS.items():
        if old in summary and new not in summary:
            summary[new] = summary.pop(old)
    return summary


def fraction_scores(summaries: list[dict], returns: list[np.ndarray], episode: int = -1) -> np.ndarray:
    """(seeds x rollouts, tasks) fraction of optimal at one episode, from evaluate.py outputs
    (rows of eval_result.npy are task-major: task_position * n_rollouts + rollout)."""
    per_seed = []
    for summary, r in zip(summaries, returns):
        n_tasks, n_rollouts = len(summary["per_task"]), summary["n_rollouts"]
        optimal = np.array([t["optimal"] for t in summary["per_task"]])
        per_seed.append(r[:, episode].reshape(n_tasks, n_rollouts).T / optimal)  # (rollouts, tasks)
    return np.concatenate(per_seed, 0)


def paired_difference(base: list[np.ndarray], new: list[np.ndarray], seed: int = 0,
                      reps: int = 10_000) -> tuple[list[float], float, float, float]:
    """new minus base for pairs of (rollouts, tasks) score matrices of the same tasks (one pair
    per training seed): (each pair's mean difference, the mean difference, and a 95% bootstrap
    interval over tasks of the pair-averaged per-task difference). The interval says how much
    the task sample moves the difference, not how much another set of seeds would."""
    per_task = np.mean([n.mean(0) - b.mean(0) for b, n in zip(base, new)], 0)
    draws = np.random.default_rng(seed).integers(0, len(per_task), (reps, len(per_task)))
    low, high = np.percentile(per_task[draws].mean(1), [2.5, 97.5])
    return ([float(n.mean() - b.mean()) for b, n in zip(base, new)], float(per_task.mean()),
            float(low), float(high))


def percent(fraction, digits: int = 0) -> str:
    """A fraction as a table's percentage; 'n/a' where it is not a number (an optimum of 0, no episode)."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        return "n/a"
    return f"{100 * value:.{digits}f}%" if np.isfinite(value) else "n/a"


def format_iqm(stats: tuple[float, float, float]) -> str:
    point, low, high = stats
    if not np.all(np.isfinite(stats)):
        return "n/a"
    return f"{100 * point:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"


def markdown_tables(header: list[str], rows: list[list[str]], width: int = 7) -> str:
    """Markdown tables of at most `width` columns that fit a documentation page: the first
    column (what a row is) heads each, the other columns follow in order, a table at a time."""
    tables = []
    for start in range(1, len(header), width - 1):
        cols = [0, *range(start, min(start + width - 1, len(header)))]
        lines = ["| " + " | ".join(header[c] for c in cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(row[c] for c in cols) + " |" for row in rows]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)
