"""Collection speed: the batched PPO backend against the Stable-Baselines3 reference.

    python bench/collect.py                      # full size: ~11 min on 2 CPU cores
    python bench/collect.py --rollouts 4         # quicker: 4 of the 13 rollouts, extrapolated
    python bench/collect.py --skip-sb3 --k2d-tasks 0
    git worktree add /tmp/base <commit> && python bench/collect.py --baseline /tmp/base   # before/after

Prints one JSON object per result:
- `backend: sb3` and `backend: batched`: env-steps/s of each on darkroom with the default
  settings (100 streams, n_steps 80, batch 40, 20 epochs), measured in this run; SB3 on
  --sb3-tasks tasks with the config's n_process workers, batched on --batched-tasks
  tasks (the same first tasks, and more);
- `result: full_darkroom_estimate`: wall time of the full default darkroom dataset (81
  tasks x 100 streams x 1040 steps) with the batched backend, from this measurement;
- `result: speedup`: batched over SB3 env-steps/s (same run, same machine), both as in a
  full-length run (see below): the median over --repeats pairs run interleaved (SB3, batched,
  SB3, batched, ...), each pair's ratio and the 1-minute load average of each half;
- `backend: batched, env: dark_key_to_door`: the same measurement on Dark Key-to-Door
  (default 9x9 settings: 8 streams, n_steps 100, batch 50, 20 epochs) for --k2d-tasks tasks, and an
  estimate for its full dataset (6561 tasks) trained in chunks of that size;
- with --baseline DIR (another checkout of the toolkit, e.g. an older commit made with
  `git worktree add`): `backend: baseline` records, the batched backend of DIR's code
  timed on the same tasks and settings, run in its own process right before each
  batched run of this code (darkroom and Dark Key-to-Door, --repeats pairs each), and
  `result: speedup_over_baseline` per environment: the median of the pairs' time ratios.

With --rollouts R < the full count, R rollouts are timed and the full time is
extrapolated per trained rollout: the batched backend does not train after its last
rollout (the update could not change the history), so a short run of it trains a
smaller share of its rollouts than a full one; SB3 trains after every rollout, so its
rate does not depend on the length.
Each record carries the 1-minute load average: other processes on the machine slow
both backends, the batched one (two busy worker threads) the most.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _toolkit import ROOT  # noqa: E402  (first: puts the toolkit, not bench/ siblings, on sys.path)

import env as envs
from algorithm import batched_ppo, history, sb3_ppo
from cli import load_config
from runtime import pick_device

CONFIGS = {"darkroom": [ROOT / "config/algorithm/ppo_darkroom.yaml", ROOT / "config/env/darkroom.yaml"],
           "dark_key_to_door": [ROOT / "config/algorithm/ppo_dark_key_to_door.yaml",
                                ROOT / "config/env/dark_key_to_door_9x9_all.yaml"]}


def config(env: str, rollouts: int | None, overrides: dict) -> dict:
    cfg = load_config(CONFIGS[env], overrides)
    if rollouts:
        cfg["total_source_timesteps"] = rollouts * cfg["n_steps"] * cfg["n_stream"]
    return cfg


def timed_collect(backend, cfg: dict, indices: list[int]) -> dict:
    """Run one backend's collect() on the tasks; histories are dropped, not written."""
    steps = 0

    def progress(n_tasks, n_env_steps):
        nonlocal steps
        steps += n_env_steps

    start = time.perf_counter()
    backend.collect(cfg, indices, envs.task_list(cfg), lambda results: None, progress)
    seconds = time.perf_counter() - start
    return {"tasks": len(indices), "n_stream": cfg["n_stream"], "rollouts": history.n_rollouts(cfg),
            "env_steps": steps, "seconds": round(seconds, 2), "env_steps_per_s": round(steps / seconds),
            "load_avg_1min": round(os.getloadavg()[0], 2), "toolkit_root": str(ROOT)}


def full_estimate(measured: dict, cfg_full: dict, n_tasks_full: int) -> float:
    """Seconds for all tasks at full length, scaling the measured time per trained rollout
    (the last rollout is never trained) and per chunk of the measured size."""
    full_rollouts = history.n_rollouts(cfg_full)
    per_chunk = measured["seconds"] * max(1, full_rollouts - 1) / max(1, measured["rollouts"] - 1)
    return per_chunk * n_tasks_full / measured["tasks"]


def emit(record: dict):
    print(json.dumps(record), flush=True)


def timed_baseline(baseline: Path, cfg: dict, n_tasks: int) -> dict:
    """timed_collect of the batched backend of another checkout, in a process that imports it."""
    proc = subprocess.run([sys.executable, __file__, "--time-config", json.dumps(cfg), "--time-tasks", str(n_tasks)],
                          env={**os.environ, "AD_TOOLKIT_ROOT": str(baseline)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the baseline at {baseline} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def ratio_record(env: str, pairs: list) -> dict:
    """Baseline seconds over this code's seconds, for each interleaved pair of equal work."""
    ratios = [base["seconds"] / new["seconds"] for base, new in pairs]
    return {"result": "speedup_over_baseline", "env": env, "order": "interleaved: baseline, this, baseline, ...",
            "repeats": len(pairs), "this_over_baseline_median": round(statistics.median(ratios), 3),
            "this_over_baseline_each": [round(r, 3) for r in ratios],
            "baseline_env_steps_per_s_each": [b["env_steps_per_s"] for b, _ in pairs],
            "env_steps_per_s_each": [n["env_steps_per_s"] for _, n in pairs],
            "load_avg_1min_baseline": [b["load_avg_1min"] for b, _ in pairs],
            "load_avg_1min_this": [n["load_avg_1min"] for _, n in pairs]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sb3-tasks", type=int, default=2, help="darkroom tasks for SB3 (default 2)")
    parser.add_argument("--batched-tasks", type=int, default=81, help="darkroom tasks for batched (default 81)")
    parser.add_argument("--rollouts", type=int, default=0,
                        help="PPO rollouts to time per backend (default 0: the full 13)")
    parser.add_argument("--n-stream", type=int, default=100, help="streams per darkroom task (default 100)")
    parser.add_argument("--k2d-tasks", type=int, default=81,
                        help="Dark Key-to-Door tasks for batched (default 81; 0 skips it)")
    parser.add_argument("--k2d-rollouts", type=int, default=3, help="Dark Key-to-Door rollouts to time (default 3)")
    parser.add_argument("--skip-sb3", action="store_true", help="only measure the batched backend")
    parser.add_argument("--repeats", type=int, default=3,
                        help="darkroom pairs (sb3, batched) run one after the other, interleaved; the speedup is "
                             "the median of the pairs' ratios (default 3)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout of the toolkit whose batched backend is timed interleaved with this "
                             "one (e.g. `git worktree add /tmp/base <commit>`)")
    # internal: one timed batched collection of the given config (how --baseline runs DIR's code)
    parser.add_argument("--time-config", help=argparse.SUPPRESS)
    parser.add_argument("--time-tasks", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_config:
        emit(timed_collect(batched_ppo, json.loads(args.time_config), list(range(args.time_tasks))))
        return
    if args.baseline is not None and not (args.baseline / "algorithm/batched_ppo.py").is_file():
        parser.error(f"--baseline {args.baseline} is not a checkout of the toolkit (no algorithm/batched_ppo.py); "
                     "make one with `git worktree add DIR <commit>`")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.rollouts == 1 or args.k2d_rollouts < 2:
        parser.error("time at least 2 rollouts: the last one is never trained, so one says nothing about updates")

    common = {"n_stream": args.n_stream, "device": args.device}
    device = pick_device(args.device)
    info = {"device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    dark = config("darkroom", args.rollouts, common)
    dark_full = load_config(CONFIGS["darkroom"], {"device": args.device})

    # A, B, A, B, ...: both backends see the same spells of load, and the ratio of each
    # pair is taken before the median, so a busy spell shifts both halves of a pair
    pairs, baseline_pairs = [], []
    for repeat in range(args.repeats):
        sb3 = None
        if not args.skip_sb3:
            sb3 = {"backend": "sb3", "env": "darkroom", "repeat": repeat, "n_process": dark["n_process"],
                   **timed_collect(sb3_ppo, dark, list(range(args.sb3_tasks))), **info}
            emit(sb3)
        if args.baseline is not None:
            base = {"backend": "baseline", "env": "darkroom", "repeat": repeat, "root": str(args.baseline),
                    **timed_baseline(args.baseline, dark, args.batched_tasks), **info}
            emit(base)
        batched = {"backend": "batched", "env": "darkroom", "repeat": repeat,
                   "workers": batched_ppo.n_workers(dark, device),
                   **timed_collect(batched_ppo, dark, list(range(args.batched_tasks))), **info}
        emit(batched)
        pairs.append((sb3, batched))
        if args.baseline is not None:
            baseline_pairs.append((base, batched))
    if baseline_pairs:
        emit(ratio_record("darkroom", baseline_pairs))
    # both rates as in a full-length run of the measured tasks
    full_length = {**dark, "total_source_timesteps": dark_full["total_source_timesteps"]}

    def batched_full_rate(measured: dict) -> float:
        return (args.batched_tasks * history.steps_per_stream(full_length) * dark["n_stream"]
                / full_estimate(measured, full_length, args.batched_tasks))

    batched = sorted((b for _, b in pairs), key=lambda b: b["seconds"])[len(pairs) // 2]  # the median run
    if args.n_stream == dark_full["n_stream"]:
        seconds = full_estimate(batched, dark_full, len(envs.task_list(dark_full)))
        emit({"result": "full_darkroom_estimate", "tasks": len(envs.task_list(dark_full)),
              "n_stream": dark_full["n_stream"], "steps_per_stream": history.steps_per_stream(dark_full),
              "seconds": round(seconds), "minutes": round(seconds / 60, 1),
              "measured_rollouts": batched["rollouts"], "full_rollouts": history.n_rollouts(dark_full)})
    if not args.skip_sb3:
        ratios = [batched_full_rate(b) / a["env_steps_per_s"] for a, b in pairs]
        emit({"result": "speedup", "env": "darkroom", "order": "interleaved: sb3, batched, sb3, batched, ...",
              "repeats": args.repeats, "batched_over_sb3_median": round(statistics.median(ratios), 1),
              "batched_over_sb3_each": [round(r, 1) for r in ratios],
              "sb3_env_steps_per_s_each": [a["env_steps_per_s"] for a, _ in pairs],
              "batched_env_steps_per_s_full_run_each": [round(batched_full_rate(b)) for _, b in pairs],
              "load_avg_1min_sb3": [a["load_avg_1min"] for a, _ in pairs],
              "load_avg_1min_batched": [b["load_avg_1min"] for _, b in pairs]})

    if args.k2d_tasks:
        k2d = config("dark_key_to_door", args.k2d_rollouts, {"device": args.device})  # its own 8 streams
        k2d_full = load_config(CONFIGS["dark_key_to_door"], {"device": args.device})
        n_full = len(envs.task_list(k2d_full))
        settings = {"grid_size": k2d["grid_size"], "horizon": k2d["horizon"], "n_steps": k2d["n_steps"],
                    "batch_size": k2d["batch_size"]}
        k2d_pairs = []
        for repeat in range(args.repeats if args.baseline is not None else 1):
            if args.baseline is not None:
                base = {"backend": "baseline", "env": "dark_key_to_door", "repeat": repeat,
                        "root": str(args.baseline), **settings,
                        **timed_baseline(args.baseline, k2d, args.k2d_tasks), **info}
                emit(base)
            measured = timed_collect(batched_ppo, k2d, list(range(args.k2d_tasks)))
            seconds = full_estimate(measured, k2d_full, n_full)
            emit({"backend": "batched", "env": "dark_key_to_door", "repeat": repeat, **settings, **measured,
                  "full_dataset_tasks": n_full, "full_dataset_estimate_hours": round(seconds / 3600, 1), **info})
            if args.baseline is not None:
                k2d_pairs.append((base, measured))
        if k2d_pairs:
            emit(ratio_record("dark_key_to_door", k2d_pairs))


if __name__ == "__main__":
    main()
