"""Evaluate trained runs in context on held-out tasks: no weight updates, only context.

    python evaluate.py runs/AD-darkroom-seed0
    python evaluate.py runs/AD-darkroom-seed0 --set eval_episodes=50 eval_rollouts=4 eval_greedy=true
    python evaluate.py runs/AD-darkroom-seed0 runs/AD-tworegion-darkroom-seed0   # + comparison plot
    python evaluate.py runs/AD-darkroom-seed0 --tag T1 --set eval_temperature=1.0  # beside the first one

Writes into each run directory: eval_result.npy (returns, rows = task x rollout,
columns = episodes), eval_summary.json, eval_curve.png (with the source learner's curve
on the same tasks and the optimal return) and TensorBoard scalars under eval_curve/.
"""
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

import env as envs
from algorithm import history
from algorithm.history import dataset_path
from cli import config_arg_parser, load_config, run_cli
from config.loading import collection_config, collection_keys, parse_set
from errors import UserError, first_line
from files import atomic_write, claim_run_dir, ensure_writable_dir, load_checkpoint
from model import build, memory_estimate
from model.rollout import rollout
from runtime import check_memory, pick_device


def load_run(run_dir: Path, overrides: dict):
    """The run's config (with overrides) and its trained model, or a clear error."""
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a training run (no config.yaml); give a directory under runs/ "
                        "that train.py wrote")
    ckpt = run_dir / "ckpt-last.pt"
    if not ckpt.is_file():
        raise UserError(f"{run_dir} has no checkpoint (ckpt-last.pt): train it first with train.py")
    saved = load_config([run_dir / "config.yaml"], {})
    cfg = load_config([run_dir / "config.yaml"], overrides)
    changed = [f"{k}={saved[k]!r} (asked {cfg[k]!r})" for k in collection_keys(cfg) if saved[k] != cfg[k]]
    if changed:  # another split or data would evaluate (and label as held out) tasks the run trained on
        raise UserError(f"{run_dir} was trained on data made with {', '.join(changed)}; evaluation keeps the "
                        "run's data settings and split: drop these --set keys")
    device = check_evaluation(cfg, f"evaluating {run_dir}")
    model = build(cfg, envs.model_inputs(cfg)).to(device)
    state = load_checkpoint(ckpt, device)
    try:
        model.load_state_dict(state["model"])
    except Exception as e:  # noqa: BLE001 - whatever does not load does not fit
        raise UserError(f"{ckpt} does not fit the run's config ({first_line(e)}); was the "
                        "model changed with --set, or the file damaged? retrain or drop the --set") from None
    return cfg, model, state.get("step", 0)


def check_evaluation(cfg: dict, what: str = "the evaluation"):
    """What an evaluation of `cfg` checks before any work (its tasks, its memory): here and in
    pipeline.py, which checks its evaluations before it collects and trains. The device."""
    device = pick_device(cfg["device"])
    n_rows = len(eval_task_indices(cfg)) * cfg["eval_rollouts"]
    parts = memory_estimate(cfg, envs.model_inputs(cfg), n_rows, training=False)
    parts["returns"] = n_rows * cfg["eval_episodes"] * 4
    check_memory(what, parts, device, "use fewer eval_rollouts, eval_episodes or tasks, or a smaller model")
    return device


def eval_task_indices(cfg: dict) -> list[int]:
    if cfg["eval_tasks"]:
        n = len(envs.task_list(cfg))
        try:
            indices = [int(x) for x in cfg["eval_tasks"].split(",")]
        except ValueError:
            raise UserError(f"eval_tasks={cfg['eval_tasks']!r}: expected comma-separated task indices") from None
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise UserError(f"eval_tasks: {bad} out of range (the environment has {n} tasks)")
        return indices
    tasks = envs.tasks_of_split(cfg, cfg["eval_split"])
    if not tasks:  # an empty evaluation would average to NaN
        raise UserError(f"eval_split={cfg['eval_split']} holds no task with these ratios (train_env_ratio="
                        f"{cfg['train_env_ratio']}, val_env_ratio={cfg['val_env_ratio']}); pick another split")
    return tasks


def source_curve(cfg: dict, task_indices: list[int]) -> np.ndarray | None:
    """Mean over the tasks' streams of the source learner's return per episode, from the dataset."""
    path = dataset_path(cfg)
    try:
        header = history.read_header(path)
    except UserError:
        return None
    diff = history.config_differences(header["collection_config"], collection_config(cfg))
    if diff or header["split"] != envs.task_split(cfg):  # e.g. collected again at the same path since
        print(f"note: no source curve: {path} now holds data made with other settings than the run's "
              f"({', '.join(diff) or 'another split'}); the evaluation itself stands")
        return None
    if any(i not in header["done"] for i in task_indices):
        return None
    damaged = history.damaged_tasks(path, header, task_indices)
    if damaged:  # the curve is a reference line; the evaluation stands without it
        print(f"note: no source curve: {path} has damaged tasks ({history.describe(damaged)})")
        return None
    import h5py
    curves = []
    with h5py.File(path, "r") as f:
        for i in task_indices:
            curves.append(history.episode_returns(f[str(i)]["rewards"][()], cfg["horizon"]).mean(1))
    return np.mean(curves, axis=0)


def episodes_to_fraction(curve: np.ndarray, optimal: float, fraction: float = 0.8):
    hit = np.flatnonzero(curve >= fraction * optimal)
    return int(hit[0]) + 1 if len(hit) else None


def summarize(cfg, task_indices, returns, stats, elapsed, source_returns) -> dict:
    n_rollouts = cfg["eval_rollouts"]
    all_tasks, split = envs.task_list(cfg), envs.task_split(cfg)
    rows = [i for i in task_indices for _ in range(n_rollouts)]
    optimal = np.array([envs.optimal_return(cfg, all_tasks[i]) for i in rows])
    curve = returns.mean(0)
    per_task = []
    for k, i in enumerate(task_indices):
        r = returns[k * n_rollouts:(k + 1) * n_rollouts]
        per_task.append({"task_index": i, "task": all_tasks[i], "first": float(r[:, 0].mean()),
                         "final": float(r[:, -1].mean()), "optimal": float(optimal[k * n_rollouts])})
    steps = returns.size * cfg["horizon"]
    summary = {
        "tasks": [all_tasks[i] for i in rows], "task_indices": rows, "split": [split[i] for i in rows],
        "optimal_return": optimal.tolist(), "n_episodes": int(returns.shape[1]), "n_rollouts": n_rollouts,
        "first_return": float(returns[:, 0].mean()), "final_return": float(returns[:, -1].mean()),
        "final_fraction_of_optimal": float(returns[:, -1].mean() / optimal.mean()),
        "first_fraction_of_optimal": float(returns[:, 0].mean() / optimal.mean()),
        "episodes_to_80pct": episodes_to_fraction(curve, optimal.mean()),
        "source_episodes_to_80pct": (None if source_returns is None
                                     else episodes_to_fraction(source_returns, optimal.mean())),
        "max_context_tokens": int(stats["max_context_tokens"]), "steps_per_second": steps / elapsed,
        "greedy": cfg["eval_greedy"], "temperature": cfg["eval_temperature"], "seed": cfg["eval_seed"],
        "eval_split": cfg["eval_split"] if not cfg["eval_tasks"] else "chosen", "memory": cfg["eval_memory"],
        "source_alg": cfg["alg"],  # the learner of the history file: what source_episodes_to_80pct measured
        "per_task": per_task,
        **{k: v for k, v in stats.items() if k != "max_context_tokens"},
    }
    return summary


def mean_interval(returns: np.ndarray, seed: int = 0, reps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile-bootstrap interval of the mean return per episode over the rows (tasks x
    rollouts) of `returns` (rows, episodes): where the mean lies, never outside the returns' range."""
    n = len(returns)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=reps)  # resampled rows
    means = counts @ returns / n
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def plot_curves(path: Path, curves: dict, optimal: float, source_returns, title: str, source: str):
    """Mean return per episode of each run with its 95% bootstrap interval over tasks x rollouts,
    and the learner that made the data (`source`: the history file's alg) on the same tasks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, returns in curves.items():
        mean, (low, high) = returns.mean(0), mean_interval(returns)
        x = np.arange(1, len(mean) + 1)
        ax.plot(x, mean, label=label)
        ax.fill_between(x, low, high, alpha=0.2)
    if source_returns is not None:
        ax.plot(np.arange(1, len(source_returns) + 1), source_returns, "k--", label=f"source {source} (same tasks)")
    ax.axhline(optimal, color="gray", linestyle=":", label="optimal")
    ax.set_xlabel("episode")
    ax.set_ylabel("return (band: 95% interval of the mean)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format=plot_format(path), dpi=120)
    plt.close(fig)


def plot_format(path: Path) -> str:
    """The image format a plot path asks for (png when it has no suffix), or a UserError."""
    from matplotlib.backend_bases import FigureCanvasBase
    fmt = Path(path).suffix[1:].lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise UserError(f"--plot {path}: matplotlib cannot write .{fmt} files; use one of "
                        f"{', '.join('.' + k for k in sorted(supported))}")
    return fmt


def check_plot_path(path: Path):
    """Before any evaluation: the comparison plot can be written where it is asked for."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--plot {path} is a directory; give a file name, e.g. {path / 'comparison.png'}")
    if path.exists() and not path.is_file():
        raise UserError(f"--plot {path} exists and is not a regular file; give another path")
    plot_format(path)
    ensure_writable_dir(path.parent, "plot directory")


def print_table(name: str, s: dict):
    print(f"\n{name}: first {s['first_return']:.2f}, final {s['final_return']:.2f} "
          f"({100 * s['final_fraction_of_optimal']:.0f}% of optimal), episodes to 80%: {s['episodes_to_80pct']}, "
          f"max context tokens {s['max_context_tokens']}, {s['steps_per_second']:,.0f} env-steps/s")
    print(f"  {'task':>5} {'goal':>16} {'first':>6} {'final':>6} {'optimal':>7} {'%opt':>5}")
    for t in s["per_task"]:
        print(f"  {t['task_index']:>5} {json.dumps(t['task'])[:16]:>16} {t['first']:>6.2f} {t['final']:>6.2f} "
              f"{t['optimal']:>7.1f} {100 * t['final'] / max(t['optimal'], 1e-9):>5.0f}")


def output_names(tag: str) -> dict:
    """File names of an evaluation; a tag keeps evaluations of one run side by side (the memory study)."""
    suffix = f"_{tag}" if tag else ""
    return {"returns": f"eval_result{suffix}.npy", "summary": f"eval_summary{suffix}.json",
            "curve": f"eval_curve{suffix}.png"}


def evaluate_run(run_dir: Path, overrides: dict, tag: str = "",
                 loaded=None) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """Evaluate one run (`loaded`: what load_run returned, when the caller checked it already)."""
    cfg, model, step = loaded or load_run(run_dir, overrides)
    if step < cfg["train_timesteps"]:  # a killed or still running training: say which checkpoint this is
        print(f"note: {run_dir} stopped training at step {step:,} of {cfg['train_timesteps']:,}; evaluating "
              "that checkpoint (rerun the same train.py command to finish it)", file=sys.stderr)
    task_indices = eval_task_indices(cfg)
    bar = tqdm(total=cfg["eval_episodes"], unit="episode", desc=run_dir.name, dynamic_ncols=True)
    tic = time.perf_counter()
    returns, stats = rollout(model, cfg, task_indices, cfg["eval_episodes"], cfg["eval_rollouts"],
                             seed=cfg["eval_seed"], greedy=cfg["eval_greedy"], progress=bar.update)
    elapsed = time.perf_counter() - tic
    bar.close()
    source_returns = source_curve(cfg, task_indices)
    summary = summarize(cfg, task_indices, returns, stats, elapsed, source_returns)
    summary["train_step"] = step
    names = output_names(tag)
    with atomic_write(run_dir / names["returns"]) as f:
        np.save(f, returns)
    with atomic_write(run_dir / names["summary"], "w") as f:
        f.write(json.dumps(summary, indent=1))
    which = cfg["eval_split"] if not cfg["eval_tasks"] else "chosen"
    plot_curves(run_dir / names["curve"], {run_dir.name: returns}, float(np.mean(summary["optimal_return"])),
                source_returns, f"{run_dir.name}: in-context return on {which} tasks",
                cfg["alg"])
    from torch.utils.tensorboard import SummaryWriter
    group = f"eval_curve{'_' + tag if tag else ''}"  # one group: the run's curve beside its source's
    with SummaryWriter(str(run_dir)) as w:
        for ep, value in enumerate(returns.mean(0)):
            w.add_scalar(f"{group}/return", float(value), ep)
        for ep, value in enumerate([] if source_returns is None else source_returns):
            w.add_scalar(f"{group}/source_return", float(value), ep)
    print_table(run_dir.name, summary)
    return summary, returns, source_returns


def check_comparable(runs: list[Path], cfgs: list[dict], tasks: list[list[int]], fix: str):
    """One comparison plot draws one optimum and one source curve: its runs must come from the same
    data (the collection keys of their configs) and be evaluated on the same `tasks` (one list per
    run); `fix` ends the refusal."""
    first = collection_config(cfgs[0])
    for run, cfg, run_tasks in zip(runs[1:], cfgs[1:], tasks[1:]):
        diff = history.config_differences(first, collection_config(cfg), asked="vs")
        if not diff and run_tasks != tasks[0]:
            diff = ["evaluated on other tasks"]
        if diff:
            raise UserError(f"{runs[0]} and {run} cannot share one comparison plot: they come from other data or tasks "
                            f"({', '.join(diff[:4])}); {fix}")


def main():
    parser = config_arg_parser(__doc__.split("\n\n")[0], "run directories written by train.py",
                               set_example="eval_episodes=50 eval_temperature=1.0")
    parser.add_argument("--plot", type=Path, help="comparison plot path (drawn when several runs are given, "
                        "or when --plot is; default: eval_comparison.png beside the first run)")
    parser.add_argument("--tag", default="", help="name suffix of the output files (eval_summary_TAG.json, ...), "
                        "so several evaluations of one run (e.g. eval_memory=drop) sit side by side")
    args = parser.parse_args()
    if not args.configs:
        parser.error("give at least one run directory, e.g. runs/AD-darkroom-seed0")
    overrides = parse_set(args.set)
    if not all(c.isalnum() or c in "_.-" for c in args.tag):
        raise UserError(f"--tag {args.tag!r}: use letters, digits, '_', '.' or '-' (it becomes part of file names)")
    runs = [Path(run) for run in args.configs]
    if len({run.resolve() for run in runs}) < len(runs):
        raise UserError("a run directory is given twice; give each once")
    plot = args.plot or runs[0].parent / "eval_comparison.png"
    with ExitStack() as held:
        # every run and the plot path are checked (and the runs held) before the first
        # evaluation, so a bad second run never costs the first run's outputs
        loaded = [load_run(run, overrides) for run in runs]
        for run in runs:
            held.enter_context(claim_run_dir(run, create=False, job=f"evaluation {args.tag}".strip()))
        compare = len(runs) > 1 or args.plot is not None  # a --plot asked for is drawn, also of one run
        if compare:
            cfgs = [cfg for cfg, _, _ in loaded]
            check_comparable(runs, cfgs, [eval_task_indices(cfg) for cfg in cfgs],
                             "evaluate them in separate evaluate.py calls")
            check_plot_path(plot)
        results = {}
        for run, run_loaded in zip(runs, loaded):
            summary, returns, source_returns = evaluate_run(run, overrides, args.tag, run_loaded)
            results[str(run) if run.name in results else run.name] = (summary, returns, source_returns)
    if compare:
        first = next(iter(results.values()))
        plot_curves(plot, {k: v[1] for k, v in results.items()}, float(np.mean(first[0]["optimal_return"])),
                    first[2], "in-context return, held-out tasks", first[0]["source_alg"])
        print(f"\ncomparison plot: {plot}")


if __name__ == "__main__":
    run_cli(main)
