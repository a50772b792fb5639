"""Paired comparison of two folders of runs that differ in one setting: % of optimal at the
last episode, run by run (paired by run name, e.g. the same variant and seed) and on average,
with a 95% bootstrap interval over the evaluation tasks.

    python scripts/compare_runs.py runs/dark_key_to_door_9x9 runs/dark_key_to_door_9x9_knobs/stride2 --variant AD
    python scripts/compare_runs.py BASE NEW --tag val_T075     # evaluations made with evaluate.py --tag val_T075

Both runs of a pair must have been evaluated on the same tasks with the same rollouts.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import report
from cli import ArgumentParser, run_cli
from errors import UserError


def paired_runs(base: Path, new: Path, variant: str | None) -> list[str]:
    """Names of the run directories (with a config.yaml) that both folders hold."""
    for folder in (base, new):  # a wrong path is not "no runs"
        if not folder.is_dir():
            raise UserError(f"folder not found: {folder}" + (" (a file, not a folder)" if folder.exists() else "")
                            + "; give the run_dir of a pipeline.py run")
    names = lambda folder: {p.parent.name for p in folder.glob("*/config.yaml")}  # noqa: E731
    both = sorted(names(base) & names(new))
    if variant:  # run names are {variant}-{env}-seed{seed}; a variant name may hold '-' (AD-tworegion)
        both = [n for n in both if n.rsplit("-", 2)[0] == variant]
    if not both:
        raise UserError(f"{base} and {new} hold no runs of the same name{' of ' + variant if variant else ''}: "
                        "give two folders that pipeline.py wrote with different --set run_dir=")
    return both


def scores(run_dir: Path, tag: str):
    summary, returns = report.load_evaluation(run_dir, tag)
    return summary, report.fraction_scores([summary], [returns])


# what an evaluation must share with its pair for the difference to measure the runs alone
SAME_EVALUATION = ("tasks", "n_rollouts", "n_episodes", "eval_split", "temperature", "greedy", "seed", "memory")


def check_comparable(base_run: Path, base: dict, new_run: Path, new: dict):
    differ = [f"{k} {base.get(k)!r} vs {new.get(k)!r}" for k in SAME_EVALUATION if base.get(k) != new.get(k)]
    if differ:
        shown = ", ".join(d if not d.startswith("tasks") else "tasks" for d in differ)
        raise UserError(f"{base_run} and {new_run} were evaluated differently ({shown}): evaluate both with the "
                        "same settings, or compare other --tag evaluations")


def compare(base: Path, new: Path, tag: str = "", variant: str | None = None) -> str:
    lines, pairs, first_tasks = [], [], None
    names = paired_runs(base, new, variant)
    for name in names:
        (sb, b), (sn, n) = scores(base / name, tag), scores(new / name, tag)
        check_comparable(base / name, sb, new / name, sn)
        first_tasks = sb["tasks"] if not pairs else first_tasks
        if sb["tasks"] != first_tasks:  # per-task differences are averaged over the pairs
            raise UserError(f"{base / name} was evaluated on other tasks than {base / names[0]}: evaluate every "
                            "run on the same eval_split")
        pairs.append((b, n))
        lines.append(f"{name}: {100 * b.mean():.1f}% -> {100 * n.mean():.1f}% ({100 * (n.mean() - b.mean()):+.1f})")
    _, mean, low, high = report.paired_difference([b for b, _ in pairs], [n for _, n in pairs])
    lines.append(f"mean difference {100 * mean:+.1f} points over {len(pairs)} pair(s), 95% bootstrap over "
                 f"{pairs[0][0].shape[1]} tasks [{100 * low:+.1f}, {100 * high:+.1f}] "
                 "(seed-to-seed spread not included)")
    return "\n".join(lines)


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="folder of the reference runs")
    p.add_argument("new", type=Path, help="folder of the runs with the changed setting")
    p.add_argument("--tag", default="", help="compare the evaluations tagged so (evaluate.py --tag); default untagged")
    p.add_argument("--variant", help="only runs of this variant (AD, AD-tworegion, CompressedAD, ...)")
    args = p.parse_args()
    print(compare(args.base, args.new, args.tag, args.variant))


if __name__ == "__main__":
    run_cli(main)
