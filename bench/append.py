"""Dataset appends: what one finished task costs as the file grows, journal vs the old copy.

    python bench/append.py                       # 10, 100 and 1,000 tasks in the file (~4 min on 2 CPU cores)
    python bench/append.py --sizes 10 100 --probes 3   # quicker

One synthetic task sized like a real default darkroom task (100 streams x 1,040 steps: a
random walk on the 9x9 grid, sparse rewards, 20-step episodes; ~0.3 MB on disk, like
the real file's 25 MB / 81 tasks) is appended again and again under new task indices.
When the file holds each of --sizes tasks, --probes more appends are timed with each
method, interleaved (journal, old, journal, old, ...):
- `method: journal`: `algorithm.history.append_tasks` as collect.py calls it (in place,
  write-ahead journal);
- `method: copy`: the earlier append, reproduced here: copy the whole file to a
  `.tmp`, append the task there, fsync, `os.replace`.
Prints one JSON object per (method, size): median `seconds_per_task` and
`bytes_written_per_task` (bytes the process passed to write calls, sendfile included:
`wchar` of /proc/self/io), the file size and one task's size on disk; then one line of
ratios: each method's cost at the largest size over the smallest (flat = 1), and copy
over journal at each size. Timings include fsync, so they depend on the disk; the load
average is in every line.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from _toolkit import ROOT  # noqa: E402,F401  (first: puts the toolkit on sys.path)

from algorithm import history
from cli import load_config

CONFIGS = [ROOT / "config/algorithm/ppo_darkroom.yaml", ROOT / "config/env/darkroom.yaml"]


def darkroom_like_task(cfg: dict, seed: int = 0) -> dict:
    """One task's arrays with the shapes, dtypes and rough entropy of a real darkroom task."""
    rng = np.random.default_rng(seed)
    T, S, grid, horizon = history.steps_per_stream(cfg), cfg["n_stream"], cfg["grid_size"], cfg["horizon"]
    actions = rng.integers(0, 5, (T, S))
    moves = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]])
    states = np.zeros((T, S, 2), dtype=np.float32)
    pos = np.full((S, 2), grid // 2)
    for t in range(T):
        if t % horizon == 0:
            pos[:] = grid // 2
        states[t] = pos
        pos = np.clip(pos + moves[actions[t]], 0, grid - 1)
    next_states = np.roll(states, -1, axis=0)
    goal = np.array([2, 6])
    rewards = (next_states == goal).all(-1).astype(np.float32)
    dones = (np.arange(T) % horizon == horizon - 1)[:, None].repeat(S, 1)
    return {"states": states, "actions": actions, "rewards": rewards, "next_states": next_states,
            "dones": dones, "compress_markers": history.compress_markers(T, cfg["n_steps"], S)}


def append_by_copy(path: Path, results: dict, tasks: list, split: list, backend: str):
    """The earlier append: the whole file is copied for every task."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.copyfile(path, tmp)
    with h5py.File(tmp, "a") as f:
        for index, h in sorted(results.items()):
            history._write_group(f, index, h, tasks[index], split[index], backend)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


METHODS = {"journal": history.append_tasks, "copy": append_by_copy}


def wchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def timed_append(method: str, path: Path, index: int, task: dict, tasks: list, split: list) -> tuple[float, int]:
    w0, t0 = wchar(), time.perf_counter()
    METHODS[method](path, {index: task}, tasks, split, "synthetic")
    return time.perf_counter() - t0, wchar() - w0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="tasks in the file when probed")
    p.add_argument("--probes", type=int, default=5, help="appends timed per method and size")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--dir", default=None, help="where the file goes (default: a temporary directory)")
    args = p.parse_args()
    cfg = load_config(CONFIGS, {})
    n_max = max(args.sizes) + args.probes * len(args.methods) * len(args.sizes) + 1
    tasks, split = [{"goal": [i, 0]} for i in range(n_max)], ["train"] * n_max  # indices past 81 goals
    task = darkroom_like_task(cfg)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "history.hdf5"
        history.create_if_missing(path, cfg, tasks, split)
        n, results = 0, []
        for size in sorted(args.sizes):
            while n < size:  # grow the file (the fast way) to the probed size
                history.append_tasks(path, {n: task}, tasks, split, "synthetic")
                n += 1
            print(f"file holds {n} tasks; probing", file=sys.stderr)
            one_task = path.stat().st_size / n
            costs = {m: [] for m in args.methods}
            for _ in range(args.probes):
                for m in args.methods:
                    costs[m].append(timed_append(m, path, n, task, tasks, split))
                    n += 1
            for m in args.methods:
                row = {"bench": "append", "method": m, "tasks_in_file": size, "probes": args.probes,
                       "seconds_per_task": statistics.median(s for s, _ in costs[m]),
                       "bytes_written_per_task": int(statistics.median(b for _, b in costs[m])),
                       "task_bytes_on_disk": int(one_task), "file_mb": round(path.stat().st_size / 1e6, 1),
                       "n_stream": cfg["n_stream"], "steps_per_stream": history.steps_per_stream(cfg),
                       "load_avg_1min": os.getloadavg()[0]}
                results.append(row)
                print(json.dumps(row), flush=True)
    lo, hi = min(args.sizes), max(args.sizes)
    pick = {(r["method"], r["tasks_in_file"]): r for r in results}
    ratios = {"bench": "append", "result": "ratios", "sizes": [lo, hi]}
    for m in args.methods:
        for k in ("seconds_per_task", "bytes_written_per_task"):
            ratios[f"{m}_{k}_{hi}_over_{lo}"] = round(pick[m, hi][k] / pick[m, lo][k], 2)
    if set(METHODS) <= set(args.methods):
        for size in sorted(args.sizes):
            for k in ("seconds_per_task", "bytes_written_per_task"):
                ratios[f"copy_over_journal_{k}_at_{size}"] = round(pick["copy", size][k] / pick["journal", size][k], 1)
    print(json.dumps(ratios), flush=True)


if __name__ == "__main__":
    main()
