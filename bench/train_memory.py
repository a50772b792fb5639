"""Peak memory of train.py as the dataset grows: 1x, 4x and 16x the tasks, same model.

    python bench/train_memory.py                                  # this code (~4 min on 2 CPU cores)
    mkdir /tmp/before && git archive 12d493f | tar -x -C /tmp/before   # the code before windows were read on demand ...
    python bench/train_memory.py --before /tmp/before             # ... measured in the same run (~8 min)
    python bench/train_memory.py --sizes 1 4 --variants AD --steps 20   # quicker

Datasets (written once into --dir, random-policy histories, darkroom-shaped: --streams
streams x 1,040 steps per task): 1x is the 5x5 darkroom (25 tasks); 4x and 16x are the
10x10 and 20x20 darkrooms (100 and 400 tasks) whose task groups are copies of the 1x
ones (the model is the same but for 2 x 15 more rows of the factored state embedding).
Each (code, variant, size) trains --steps steps of the committed CPU-size config in a
fresh `train.py` process (num_workers 0, the default; held-out test batches every
--steps // 2 steps; no rollouts), and prints one JSON object: `peak_rss_mb` (the
process's ru_maxrss from wait4), `targets_per_second` (the last `train/targets_per_second`
it logged), the dataset's windows and file size. Variants: `AD` (ad_dr.yaml) and
`CompressedAD` (ad_compressed_dr.yaml, n_transit 20, stages of 10, depths 0..5). The
last line holds the ratios: peak RSS at 16x over 1x per code and variant (flat = 1), and
this code's targets/s over the old code's.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _toolkit import ROOT  # noqa: E402  (first: puts the toolkit on sys.path)

sys.path.insert(0, str(ROOT / "tests"))
from fixtures_history import random_histories

import env as envs
from algorithm import history
from algorithm.history import dataset_path
from cli import load_config

ALG, ENV = ROOT / "config/algorithm/ppo_darkroom.yaml", ROOT / "config/env/darkroom.yaml"
GRIDS = {1: 5, 4: 10, 16: 20}  # size -> darkroom grid: 25, 100, 400 tasks
VARIANTS = {"AD": (ROOT / "config/model/ad_dr.yaml", []),
            "CompressedAD": (ROOT / "config/model/ad_compressed_dr.yaml", ["n_transit=20", "max_compression_depth=5"])}


def data_sets(size: int, streams: int, directory: Path) -> list[str]:
    return [f"grid_size={GRIDS[size]}", f"n_stream={streams}", f"total_source_timesteps={streams * 1040}",
            f"dataset_dir={directory / f'x{size}'}"]


def build_datasets(sizes, streams: int, directory: Path):
    """The 1x file from a random policy, the larger ones from copies of its task groups."""
    base_cfg = load_config([ALG, ENV], _parsed(data_sets(1, streams, directory)))
    base = None
    for size in sorted(sizes):
        cfg = load_config([ALG, ENV], _parsed(data_sets(size, streams, directory)))
        path = dataset_path(cfg)
        if path.exists():
            continue
        if base is None:
            base = random_histories(base_cfg, range(len(envs.task_list(base_cfg))))
        tasks, split = envs.task_list(cfg), envs.task_split(cfg)
        history.create_if_missing(path, cfg, tasks, split)
        for start in range(0, len(tasks), 25):
            chunk = {i: base[i % len(base)] for i in range(start, min(start + 25, len(tasks)))}
            history.append_tasks(path, chunk, tasks, split, "random")
        print(f"wrote {path} ({len(tasks)} tasks, {path.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)


def _parsed(sets: list[str]) -> dict:
    from config.loading import parse_set
    return parse_set(sets)


def last_scalar(run_dir: Path, tag: str) -> float | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag)[-1].value if tag in acc.Tags()["scalars"] else None


def train_once(code: Path, variant: str, size: int, cache_mb: int | None, args, run_root: Path) -> dict:
    model_cfg, extra = VARIANTS[variant]
    runs = run_root / f"{code.name}-{variant}-x{size}-cache{cache_mb}"
    if cache_mb is not None:
        extra = extra + [f"data_cache_mb={cache_mb}"]
    sets = data_sets(size, args.streams, Path(args.dir)) + extra + [
        f"train_timesteps={args.steps}", f"log_interval={max(1, args.steps // 4)}",
        f"test_interval={max(1, args.steps // 2)}", "eval_interval=0", f"ckpt_interval={args.steps}",
        "device=cpu", "num_workers=0", f"cpu_threads={args.threads}", f"run_dir={runs}"]
    cmd = [sys.executable, str(code / "train.py"), str(ALG), str(ENV), str(code / model_cfg.relative_to(ROOT)),
           "--set", *sets]
    log = open(runs.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, cwd=code, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    _, status, usage = os.wait4(proc.pid, 0)
    log.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train.py failed: see {runs.with_suffix('.log')}")
    run_dir = next(p for p in runs.iterdir() if p.is_dir())
    cfg = load_config([ALG, ENV], _parsed(data_sets(size, args.streams, Path(args.dir))))
    path = dataset_path(cfg)
    windows = re.search(r"([\d,]+) training windows", runs.with_suffix(".log").read_text())
    return {"bench": "train_memory", "code": args.labels[str(code)], "variant": variant, "size": f"{size}x",
            "data_cache_mb": cache_mb,
            "tasks": len(envs.task_list(cfg)), "streams": args.streams, "file_mb": round(path.stat().st_size / 1e6, 1),
            "training_windows": int(windows.group(1).replace(",", "")) if windows else None, "steps": args.steps,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "targets_per_second": last_scalar(run_dir, "train/targets_per_second"),
            "threads": args.threads, "load_avg_1min": os.getloadavg()[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], choices=sorted(GRIDS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--streams", type=int, default=50, help="streams per task (1,040 steps each)")
    p.add_argument("--steps", type=int, default=40, help="training steps per run")
    p.add_argument("--threads", type=int, default=1, help="torch threads of train.py")
    p.add_argument("--before", default=None, help="a copy of the old code (e.g. git archive 12d493f) "
                   "to measure in the same run")
    p.add_argument("--cache-mb", type=int, nargs="+", default=[0, 1024],
                   help="data_cache_mb values of this code to measure side by side (the old code has none)")
    p.add_argument("--dir", default=None, help="where the datasets go (default: a temporary directory); "
                   "reused when they exist")
    args = p.parse_args()
    codes = [ROOT] + ([Path(args.before).resolve()] if args.before else [])
    args.labels = {str(ROOT): "this", **({str(codes[1]): "before"} if args.before else {})}
    with tempfile.TemporaryDirectory() as tmp:
        args.dir = args.dir or tmp
        build_datasets(args.sizes, args.streams, Path(args.dir))
        rows = []
        for variant in args.variants:
            for size in args.sizes:
                runs = [(ROOT, mb) for mb in args.cache_mb] + [(c, None) for c in codes[1:]]
                for code, cache_mb in runs:  # interleaved: this (each budget), before, this, ...
                    rows.append(train_once(code, variant, size, cache_mb, args, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
    for r in rows:  # "this" at each budget is its own code line in the ratios
        r["code"] = r["code"] if r["data_cache_mb"] is None else f"{r['code']}_cache{r['data_cache_mb']}"
    args.labels = {f"this_cache{mb}": f"this_cache{mb}" for mb in args.cache_mb} | (
        {"before": "before"} if args.before else {})
    pick = {(r["code"], r["variant"], r["size"]): r for r in rows}
    lo, hi = f"{min(args.sizes)}x", f"{max(args.sizes)}x"
    ratios = {"bench": "train_memory", "result": "ratios"}
    for code in args.labels.values():
        for v in args.variants:
            ratios[f"{code}_{v}_peak_rss_{hi}_over_{lo}"] = round(pick[code, v, hi]["peak_rss_mb"]
                                                                  / pick[code, v, lo]["peak_rss_mb"], 2)
    others = [c for c in args.labels if c != f"this_cache{args.cache_mb[0]}"]
    for other in others:  # the first budget (the default) against the rest and the old code
        for v in args.variants:
            for s in args.sizes:
                a, b = pick[f"this_cache{args.cache_mb[0]}", v, f"{s}x"], pick[other, v, f"{s}x"]
                if a["targets_per_second"] and b["targets_per_second"]:
                    ratios[f"{v}_targets_per_second_cache{args.cache_mb[0]}_over_{other}_{s}x"] = round(
                        a["targets_per_second"] / b["targets_per_second"], 2)
    print(json.dumps(ratios), flush=True)


if __name__ == "__main__":
    main()
