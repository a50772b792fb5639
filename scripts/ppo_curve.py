"""The source PPO's own learning curve in a history file: mean % of optimal per episode over
tasks and streams, and the share of streams at optimal; the first thing to measure before
distilling a new setting (are the streams long enough for PPO to solve most tasks?).

    python scripts/ppo_curve.py datasets/dark_key_to_door_9x9/history_dark_key_to_door_PPO_alg-seed42.hdf5
    python scripts/ppo_curve.py FILE --split test        # only the held-out test tasks
"""
import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env as envs  # noqa: E402
from algorithm import history  # noqa: E402
from utils import UserError, run_cli  # noqa: E402


def fraction_of_optimal(path: Path, split: str) -> np.ndarray:
    """(tasks, episodes, streams) return / optimal return of the finished tasks of `split`."""
    header = history.read_header(path)
    cfg = header["collection_config"]
    indices = [i for i in header["done"] if split == "all" or header["split"][i] == split]
    if not indices:
        raise UserError(f"{path} has no finished {split} task")
    horizon, out = cfg["horizon"], []
    with h5py.File(path, "r") as f:
        for i in indices:
            returns = history.episode_returns(f[str(i)]["rewards"][()], horizon)
            out.append(returns / envs.optimal_return(cfg, header["tasks"][i]))
    return np.stack(out)


def first_episode_reaching(curve: np.ndarray, level: float):
    hit = np.flatnonzero(curve >= level)
    return int(hit[0]) + 1 if len(hit) else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path, help="a history file written by collect.py")
    p.add_argument("--split", default="all", choices=("all", "train", "val", "test"))
    args = p.parse_args()
    frac = fraction_of_optimal(args.file, args.split)
    curve = frac.mean((0, 2))
    print(f"{frac.shape[0]} {args.split} tasks x {frac.shape[2]} streams x {frac.shape[1]} episodes")
    print("| episode | % of optimal | streams at optimal |\n|---|---|---|")
    for ep in sorted({1, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400, frac.shape[1]}):
        if ep <= frac.shape[1]:
            print(f"| {ep} | {100 * curve[ep - 1]:.1f}% | {100 * np.mean(frac[:, ep - 1] >= 0.99):.0f}% |")
    print(f"episodes to 80% of optimal: {first_episode_reaching(curve, 0.8)}, "
          f"to 90%: {first_episode_reaching(curve, 0.9)}")


if __name__ == "__main__":
    run_cli(main)
