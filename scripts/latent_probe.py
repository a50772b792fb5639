"""What CompressedAD's latents hold on Dark Key-to-Door: a linear probe for the key and the door.

On the validation tasks' recorded streams of the run's data, the latents a rollout would read
after `span` steps are folded from the stages before that point (as training folds them), and a
ridge-regression probe maps them to the key's and the door's coordinates. It is fitted on half of
the tasks and scored on the other half: the share of samples whose rounded prediction is the
exact cell, split by whether the summarised steps visited that cell. Rows of another task's
latents (shuffled) give the chance level.

    python scripts/latent_probe.py runs/dark_key_to_door_9x9_q/CompressedAD-dark_key_to_door-seed0
    python scripts/latent_probe.py RUN --streams 8 --points 5 10 15 20   # episodes whose end is probed
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from algorithm import history
from algorithm.history import dataset_path
from cli import ArgumentParser, run_cli
from dataset import ADDataset, stage_len
from errors import UserError
from evaluate import load_run
from tokens import window_tokens


def stage_rows(cfg: dict, views: list, starts: list[int], length: int) -> dict:
    """Steps [a, a + length) of each view as one stage batch, as CompressedAD's encoder reads it."""
    rows = [window_tokens(cfg, view, a, a + length) for view, a in zip(views, starts)]
    tokens = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
    return tokens | {"mask": torch.ones(len(rows), length, dtype=torch.bool)}


def probe_samples(model, cfg: dict, streams: int, points: list[int]) -> dict:
    """Latents (n, features), key and door cells (n, 2) and whether the summarised steps visited them."""
    data = ADDataset(dataset_path(cfg), cfg, part="val")
    goals = history.read_header(data.path)["tasks"]
    S, M = stage_len(cfg["n_transit"]), model.latent_sets
    for episode in points:
        end = episode * cfg["horizon"]
        if end > data.T or end < M * S:
            raise UserError(f"--points {episode}: its end (step {end}) must hold {M} stages of {S} steps and fit "
                            f"a stream of {data.T}")
    latents, cells, visited, task_of = [], [], [], []
    for t, task in enumerate(data.tasks):
        goal = goals[task]
        views = [data.stream_view(task, s) for s in data.streams[:streams] for _ in points]
        ends = [p * cfg["horizon"] for _ in data.streams[:streams] for p in points]
        with torch.no_grad():
            stages = [stage_rows(cfg, views, [e - M * S + i * S for e in ends], S) for i in range(M)]
            latents.append(model.latents_of(stages).flatten(1).numpy())
        for view, e in zip(views, ends):
            seen = {tuple(c) for c in np.asarray(view["states"][e - M * S:e])[:, :2].astype(int)}
            visited.append([tuple(goal["key"]) in seen, tuple(goal["door"]) in seen])
        cells += [[goal["key"], goal["door"]]] * len(views)
        task_of += [t] * len(views)
    return {"x": np.concatenate(latents), "cells": np.asarray(cells, dtype=float), "visited": np.asarray(visited),
            "task": np.asarray(task_of)}


def ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    x1 = np.hstack([x, np.ones((len(x), 1))])
    return np.linalg.solve(x1.T @ x1 + alpha * np.eye(x1.shape[1]), x1.T @ y)


def exact_cell(w: np.ndarray, x: np.ndarray, cells: np.ndarray) -> np.ndarray:
    predicted = np.rint(np.hstack([x, np.ones((len(x), 1))]) @ w)
    return np.all(predicted == cells, axis=1)


def report(s: dict, alpha: float, seed: int) -> list[str]:
    """Exact-cell accuracy on the held-out half of the tasks, for the key and the door."""
    rng = np.random.default_rng(seed)
    fit = np.isin(s["task"], rng.permutation(s["task"].max() + 1)[: (s["task"].max() + 1) // 2])
    shuffled = s["x"][~fit][rng.permutation((~fit).sum())]
    lines = ["| hidden cell | visited in the summarised steps | samples | probe: exact cell | chance (shuffled rows) |",
             "|---|---|---|---|---|"]
    for i, name in enumerate(("key", "door")):
        w = ridge(s["x"][fit], s["cells"][fit, i], alpha)
        hit, chance = exact_cell(w, s["x"][~fit], s["cells"][~fit, i]), exact_cell(w, shuffled, s["cells"][~fit, i])
        for label, rows in (("yes", s["visited"][~fit, i]), ("no", ~s["visited"][~fit, i])):
            if rows.any():
                lines.append(f"| {name} | {label} | {rows.sum()} | {hit[rows].mean():.0%} | "
                             f"{chance[rows].mean():.0%} |")
    return lines


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("run", type=Path, help="a CompressedAD run folder on Dark Key-to-Door data")
    p.add_argument("--streams", type=int, default=8, help="streams per validation task (default 8)")
    p.add_argument("--points", type=int, nargs="+", default=[5, 10, 15, 20],
                   help="episodes at whose end the latents are probed (default 5 10 15 20)")
    p.add_argument("--alpha", type=float, default=1.0, help="ridge penalty (default 1.0)")
    args = p.parse_args(argv)
    cfg, model, _ = load_run(args.run, {"device": "cpu"})
    if cfg["model"] != "CompressedAD" or cfg["env"] != "dark_key_to_door":
        raise UserError(f"{args.run} is a {cfg['model']} run on {cfg['env']}; give a CompressedAD run on "
                        "dark_key_to_door")
    samples = probe_samples(model.eval(), cfg, args.streams, args.points)
    print("\n".join(report(samples, args.alpha, seed=0)))


if __name__ == "__main__":
    run_cli(main)
