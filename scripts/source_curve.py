"""The source learner's own learning curve in a history file (PPO, QLearning, PosteriorSampling
or NoisyExpert): mean % of optimal per episode over tasks and streams, and the share of streams
at optimal; the first thing to measure before distilling a new setting (are the streams long
enough for the source to solve most tasks?).

It also says how much of a stream's learning its own history explains: whether a stream keeps
what it found (after its first optimal episode, are the next ones optimal too? a model reading the
stream learns to go back only where the source did), and whether it was led by other streams.
Streams that share one learner (`learners_per_task` below `n_stream`) share a policy: a stream whose first
reward comes after the learner was updated on another stream's first reward may have been
led there by what it never saw, which a model reading that one stream cannot predict.

    python scripts/source_curve.py datasets/dark_key_to_door_9x9/history_dark_key_to_door_PPO_alg-seed42.hdf5
    python scripts/source_curve.py FILE --split test        # only the held-out test tasks
    python collect.py ALG.yaml ENV.yaml --split val --set ...  # try settings on the validation tasks only
    python scripts/source_curve.py FILE.val.hdf5 --split val
"""
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env as envs
from algorithm import history
from cli import ArgumentParser, run_cli
from errors import UserError


def finished_tasks(path: Path, split: str) -> tuple[dict, list[int]]:
    """(header, the finished tasks of `split`), or a UserError where there are none or some are
    damaged (read before any of them is, so a damaged task is one line, not a traceback)."""
    header = history.read_header(path)
    indices = [i for i in header["done"] if split == "all" or header["split"][i] == split]
    if not indices:
        raise UserError(f"{path} has no finished {split} task")
    damaged = history.damaged_tasks(path, header, indices)
    if damaged:
        raise UserError(f"{path} has damaged tasks ({history.describe(damaged)}): rerun the collect.py command "
                        "that wrote it to collect them again")
    return header, indices


def fraction_of_optimal(path: Path, split: str) -> np.ndarray:
    """(tasks, episodes, streams) return / optimal return of the finished tasks of `split`."""
    header, indices = finished_tasks(path, split)
    cfg = header["collection_config"]
    horizon, out = cfg["horizon"], []
    if history.steps_per_stream(cfg) < horizon:  # no whole episode: every mean would be NaN
        raise UserError(f"{path}: a stream of {history.steps_per_stream(cfg)} steps holds no whole episode of "
                        f"horizon={horizon}, so there is no curve to show")
    with h5py.File(path, "r") as f:
        for i in indices:
            returns = history.episode_returns(f[str(i)]["rewards"][()], horizon)
            out.append(returns / envs.optimal_return(cfg, header["tasks"][i]))
    return np.stack(out)


def first_reward_steps(path: Path, split: str) -> tuple[list[np.ndarray], dict]:
    """Per finished task of `split`: the step of each stream's first nonzero reward (the
    stream's length T if none), shape (n_stream,); and the collection config."""
    header, indices = finished_tasks(path, split)
    out = []
    with h5py.File(path, "r") as f:
        for i in indices:
            rewarded = f[str(i)]["rewards"][()] != 0  # (T, S)
            out.append(np.where(rewarded.any(0), rewarded.argmax(0), rewarded.shape[0]))
    return out, header["collection_config"]


def led_by_another_stream(first: np.ndarray, n_steps: int, learners: int, length: int) -> np.ndarray:
    """(n_stream,) bool: the stream got a reward (first < length) and its first came after its
    learner's policy had been updated on another stream's first reward (updates follow each
    rollout of n_steps; the streams of a task are its learners' streams in order)."""
    out = np.zeros(len(first), bool)
    for group in np.split(np.arange(len(first)), learners):
        for s in group:
            others = first[group[group != s]]
            if len(others) == 0 or first[s] >= length:
                continue
            earliest = others.min()
            updated_at = (earliest // n_steps + 1) * n_steps  # the update after the rollout holding it
            out[s] = earliest < first[s] and first[s] >= updated_at
    return out


def print_first_rewards(path: Path, split: str):
    firsts, cfg = first_reward_steps(path, split)
    learners = cfg.get("learners_per_task", 1)  # files collected before the key had one learner
    first = np.concatenate(firsts)
    length = history.steps_per_stream(cfg)
    found = first < length
    per = cfg["n_stream"] // learners
    median = (f"median episode {np.median(first[found]) // cfg['horizon'] + 1:.0f}" if found.any()
              else "no stream got one")
    if cfg.get("alg", "PPO") != "PPO":  # one learner (or policy) per stream: streams never share anything
        print(f"first reward of a stream: {median} ({100 * found.mean():.0f}% of streams get one); "
              f"independent streams (alg {cfg['alg']})")
        return
    if not found.any():
        print(f"first reward of a stream: no stream got a reward; {per} stream(s) per learner")
        return
    led = np.concatenate([led_by_another_stream(f, cfg["n_steps"], learners, length) for f in firsts])
    print(f"first reward of a stream: {median} "
          f"({100 * found.mean():.0f}% of streams get one); {per} stream(s) per learner; "
          f"{100 * led.mean():.0f}% of streams got theirs after their learner was updated on another "
          "stream's first reward")


def kept_after_first_optimal(frac: np.ndarray, after: int = 4) -> tuple[float, int]:
    """How well a stream keeps what it found, from its own episodes: over the streams whose first
    optimal episode has `after` episodes behind it, the share of those episodes that are optimal
    too (a learner that exploits what it found: near 1). Returns (share, streams counted)."""
    optimal = frac >= 0.99  # (tasks, episodes, streams)
    n_episodes = optimal.shape[1]
    shares = []
    for task in optimal:
        for stream in task.T:
            hits = np.flatnonzero(stream)
            if len(hits) and hits[0] + after < n_episodes:
                shares.append(stream[hits[0] + 1:hits[0] + 1 + after].mean())
    return (float(np.mean(shares)) if shares else float("nan")), len(shares)


def first_episode_reaching(curve: np.ndarray, level: float):
    hit = np.flatnonzero(curve >= level)
    return int(hit[0]) + 1 if len(hit) else None


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path, help="a history file written by collect.py")
    p.add_argument("--split", default="all", choices=("all", "train", "val", "test"))
    args = p.parse_args()
    frac = fraction_of_optimal(args.file, args.split)
    curve = frac.mean((0, 2))
    print(f"{frac.shape[0]} {args.split} tasks x {frac.shape[2]} streams x {frac.shape[1]} episodes")
    print("| episode | % of optimal | streams at optimal |\n|---|---|---|")
    for ep in sorted({1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 400, frac.shape[1]}):
        if ep <= frac.shape[1]:
            print(f"| {ep} | {100 * curve[ep - 1]:.1f}% | {100 * np.mean(frac[:, ep - 1] >= 0.99):.0f}% |")
    print(f"episodes to 80% of optimal: {first_episode_reaching(curve, 0.8)}, "
          f"to 90%: {first_episode_reaching(curve, 0.9)}")
    kept, counted = kept_after_first_optimal(frac)
    if counted:
        print(f"after a stream's first optimal episode, {100 * kept:.0f}% of its next 4 episodes are optimal too "
              f"({counted} streams)")
    print_first_rewards(args.file, args.split)


if __name__ == "__main__":
    run_cli(main)
