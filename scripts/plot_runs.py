"""Draw the in-context return of evaluated runs from their saved outputs: no new rollout.

The curves of `evaluate.py` (mean return per episode, 95% bootstrap band), one per run, with the
source learner's curve on the same tasks (from the history file, when it still holds the runs'
data) and the optimal return. The runs must come from the same data and be evaluated on the same
tasks.

    python scripts/plot_runs.py runs/k2d9/AD-dark_key_to_door-seed0 runs/k2d9/CompressedAD-dark_key_to_door-seed0 \\
        --tag test_T05 --out docs/results/dark_key_to_door_9x9.png
"""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import report
from cli import ArgumentParser, load_config, run_cli
from evaluate import check_comparable, check_plot_path, plot_curves, source_curve


def curve_labels(runs: list[Path]) -> list[str]:
    """Each run's folder name, or parent/name where two runs share a name (seeds of two studies)."""
    names = [run.name for run in runs]
    return [f"{run.parent.name}/{run.name}" if names.count(run.name) > 1 else run.name for run in runs]


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("runs", type=Path, nargs="+", help="evaluated run folders")
    p.add_argument("--tag", default="", help="the evaluation to draw (evaluate.py --tag; default: the untagged one)")
    p.add_argument("--out", type=Path, required=True, help="image path (.png, .svg, ...)")
    p.add_argument("--title", default="in-context return, held-out tasks", help="plot title")
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: the folder names)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        p.error(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs; give one per run")
    check_plot_path(args.out)
    evaluations = [report.load_evaluation(run, args.tag) for run in args.runs]
    summaries = [summary for summary, _ in evaluations]
    cfgs = [load_config([run / "config.yaml"], {}) for run in args.runs]
    check_comparable(args.runs, cfgs, [summary["task_indices"] for summary in summaries],
                     "plot evaluations of the same data and tasks (the same eval_split or eval_tasks) together")
    source = source_curve(cfgs[0], summaries[0]["task_indices"])
    curves = dict(zip(args.labels or curve_labels(args.runs), (returns for _, returns in evaluations)))
    plot_curves(args.out, curves, float(np.mean(summaries[0]["optimal_return"])), source, args.title,
                summaries[0]["source_alg"])
    print(f"plot: {args.out}")


if __name__ == "__main__":
    run_cli(main)
