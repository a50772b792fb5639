"""Paired comparison of two folders of runs that differ in one setting: % of optimal at the
last episode, run by run (paired by run name, e.g. the same variant and seed) and on average,
with a 95% bootstrap interval over the evaluation tasks.

    python scripts/compare_runs.py runs/dark_key_to_door_9x9 runs/dark_key_to_door_9x9_knobs/stride2 --variant AD
    python scripts/compare_runs.py BASE NEW --tag val_T075     # evaluations made with evaluate.py --tag val_T075

Both runs of a pair must have been evaluated on the same tasks with the same rollouts.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import report  # noqa: E402
from utils import UserError, run_cli  # noqa: E402


def paired_runs(base: Path, new: Path, variant: str | None) -> list[str]:
    """Names of the run directories (with a config.yaml) that both folders hold."""
    names = lambda folder: {p.parent.name for p in folder.glob("*/config.yaml")}  # noqa: E731
    both = sorted(names(base) & names(new))
    if variant:
        both = [n for n in both if n.startswith(f"{variant}-")]
    if not both:
        raise UserError(f"{base} and {new} hold no runs of the same name{' of ' + variant if variant else ''}: "
                        "give two folders that pipeline.py wrote with different --set run_dir=")
    return both


def scores(run_dir: Path, tag: str):
    summary, returns = report.load_evaluation(run_dir, tag)
    return summary, report.fraction_scores([summary], [returns])


def compare(base: Path, new: Path, tag: str = "", variant: str | None = None) -> str:
    lines, pairs = [], []
    for name in paired_runs(base, new, variant):
        (sb, b), (sn, n) = scores(base / name, tag), scores(new / name, tag)
        if sb["tasks"] != sn["tasks"] or b.shape != n.shape:
            raise UserError(f"{base / name} and {new / name} were evaluated on different tasks or rollouts: "
                            "evaluate both with the same eval_split and eval_rollouts")
        pairs.append((b, n))
        lines.append(f"{name}: {100 * b.mean():.1f}% -> {100 * n.mean():.1f}% ({100 * (n.mean() - b.mean()):+.1f})")
    _, mean, low, high = report.paired_difference([b for b, _ in pairs], [n for _, n in pairs])
    lines.append(f"mean difference {100 * mean:+.1f} points over {len(pairs)} pair(s), 95% bootstrap over "
                 f"{pairs[0][0].shape[1]} tasks [{100 * low:+.1f}, {100 * high:+.1f}] (seed-to-seed spread not included)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="folder of the reference runs")
    p.add_argument("new", type=Path, help="folder of the runs with the changed setting")
    p.add_argument("--tag", default="", help="compare the evaluations tagged so (evaluate.py --tag); default untagged")
    p.add_argument("--variant", help="only runs of this variant (AD, AD-tworegion, CompressedAD, ...)")
    args = p.parse_args()
    print(compare(args.base, args.new, args.tag, args.variant))


if __name__ == "__main__":
    run_cli(main)
