"""Where a Dark Key-to-Door agent falls short: finding the key, remembering it, or the door.

Every episode ends with return 0 (no key), 1 (the key only) or 2 (key, then door). For the
learner that made the data (PPO, or another `alg`: the held-out tasks' streams in the history
file) and for evaluated runs (their rollouts, pooled over the runs given), this prints
- the share of episodes ending 0 / 1 / 2 at a few points of the learning curve;
- how often the next episode repeats what this one reached (exploitation: is the key, or the
  door, remembered once found?) and how often an episode without the key is followed by one
  with it, or one that reached the key only by one that reached the door too (exploration: how
  well does it search?). A model trained with `episode_stride` k learns from windows of every
  k-th episode, so for it the source gets a second row: from episode i to episode i + k, over all
  of its episodes.

    python scripts/key_to_door_outcomes.py runs/dark_key_to_door_9x9/AD-dark_key_to_door-seed*
    python scripts/key_to_door_outcomes.py RUN... --tag val_T075      # eval_result_val_T075.npy
    python scripts/key_to_door_outcomes.py RUN... --episodes 10       # the first 10 episodes only
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from source_curve import fraction_of_optimal

from algorithm.history import dataset_path
from cli import ArgumentParser, load_config, run_cli
from errors import UserError
from report import load_evaluation

POINTS = {"1-5": slice(0, 5), "10": slice(9, 10), "20": slice(19, 20), "50": slice(49, 50), "91-100": slice(90, 100)}


def run_outcomes(run_dir: Path, tag: str) -> tuple[np.ndarray, dict]:
    """(rollouts, episodes) outcomes 0/1/2 of one evaluated run, and its eval summary."""
    summary, returns = load_evaluation(run_dir, tag)
    optimal = {t["optimal"] for t in summary["per_task"]}
    if optimal != {2.0}:
        raise UserError(f"{run_dir} is not a Dark Key-to-Door evaluation (optimal returns {sorted(optimal)}, "
                        "expected 2: key, then door)")
    return np.rint(returns), summary


def source_outcomes(run_dirs: list[Path], split: str) -> tuple[str, np.ndarray, int]:
    """(row name, (tasks x streams, episodes) outcomes, episode stride) of the learner that made
    the runs' data (PPO, or another `alg`) on the runs' evaluation split; the stride is the runs'
    `episode_stride`, the gap between episodes their training windows showed."""
    configs = [load_config([d / "config.yaml"]) for d in run_dirs]
    datasets = {dataset_path(cfg) for cfg in configs}
    if len(datasets) > 1:
        raise UserError(f"the runs were trained on different datasets ({', '.join(map(str, sorted(datasets)))}); "
                        "compare runs of one dataset, or pass --no-source")
    strides = {cfg["episode_stride"] for cfg in configs}
    if len(strides) > 1:
        raise UserError(f"the runs were trained with different episode_stride ({sorted(strides)}); compare runs of "
                        "one stride, or pass --no-source")
    frac = fraction_of_optimal(datasets.pop(), split)  # (tasks, episodes, streams)
    outcomes = np.rint(2 * frac).transpose(0, 2, 1).reshape(-1, frac.shape[1])
    return f"source {configs[0]['alg']}", outcomes, strides.pop()


def shares(outcomes: np.ndarray, episodes: slice) -> str:
    x = outcomes[:, episodes]
    return " / ".join(f"{100 * np.mean(x == k):.0f}" for k in (0, 1, 2)) if x.size else "-"


def transitions(outcomes: np.ndarray, gap: int = 1) -> list[str]:
    """P(key next | key now), P(door next | door now), P(key next | no key now),
    P(door next | key only now), each with its count; "next" is `gap` episodes on."""
    now, then = outcomes[:, :-gap], outcomes[:, gap:]

    def conditional(given, event):
        return f"{100 * event[given].mean():.0f}% ({given.sum()})" if given.any() else "-"
    return [conditional(now >= 1, then >= 1), conditional(now == 2, then == 2), conditional(now == 0, then >= 1),
            conditional(now == 1, then == 2)]


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("runs", type=Path, nargs="+", help="evaluated run directories; the seeds of one variant in one "
                   "folder are pooled into one row")
    p.add_argument("--tag", default="", help="read eval_result_TAG.npy (evaluate.py --tag) instead of eval_result.npy")
    p.add_argument("--no-source", action="store_true", help="leave out the source learner's row")
    p.add_argument("--episodes", type=int, help="count only the first N episodes (default: as many as the runs' "
                   "evaluations hold; the source's streams are cut to the same length)")
    args = p.parse_args()
    if args.episodes is not None and args.episodes < 2:
        raise UserError(f"--episodes {args.episodes}: the next-episode rates need at least 2 episodes")
    rows, splits = {}, set()
    several_folders = len({d.resolve().parent for d in args.runs}) > 1  # then pool within a folder only
    for run_dir in args.runs:
        outcomes, summary = run_outcomes(run_dir, args.tag)
        splits.add(summary["eval_split"])
        name = f"{run_dir.name.replace('-dark_key_to_door', '').split('-seed')[0]} (T {summary['temperature']})"
        if several_folders:
            name = f"{run_dir.resolve().parent.name}/{name}"
        rows[name] = np.concatenate([rows[name], outcomes]) if name in rows else outcomes
    if len(splits) > 1:
        raise UserError(f"the runs were evaluated on different splits ({sorted(splits)}); compare one split at a time")
    ran = min(r.shape[1] for r in rows.values())  # the runs' own, not the source's
    if args.episodes and args.episodes > ran:  # a column or a range of episodes never run would be a false label
        raise UserError(f"--episodes {args.episodes}: the evaluations ran {ran} episodes; use --episodes {ran} or "
                        "fewer, or evaluate longer (eval_episodes)")
    episodes = args.episodes or ran
    strided_source = {}  # the source as a strided model's training windows show it, over all its episodes
    if not args.no_source:
        source, outcomes, stride = source_outcomes(args.runs, splits.pop())
        rows = {source: outcomes} | rows
        if 1 < stride < outcomes.shape[1]:
            name = f"{source}, episode i to i + {stride} (episodes 1-{outcomes.shape[1]})"
            strided_source[name] = transitions(outcomes, stride)
    rows = {name: r[:, :episodes] for name, r in rows.items()}  # every row over the same episodes
    points = {k: s for k, s in POINTS.items() if s.start < episodes}  # only episodes that were run
    points = {(k if s.stop <= episodes else f"{s.start + 1}-{episodes}" if s.start + 1 < episodes else str(episodes)): s
              for k, s in points.items()}
    print("% of episodes ending with no key / the key only / key and door, by episode\n")
    print("| who | " + " | ".join(f"episode {k}" for k in points) + " |\n|---|" + "---|" * len(points))
    for name, outcomes in rows.items():
        print(f"| {name} | " + " | ".join(shares(outcomes, s) for s in points.values()) + " |")
    print(f"\nnext episode given this one, over episodes 1-{episodes} (count of this-episode cases)\n")
    print("| who | key again after the key | door again after the door | key after no key | door after the key only |"
          "\n|---|---|---|---|---|")
    rates = {name: transitions(outcomes) for name, outcomes in rows.items()}
    if strided_source:  # right below the source's own row
        rates = {source: rates.pop(source)} | strided_source | rates
    for name, row in rates.items():
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    run_cli(main)
