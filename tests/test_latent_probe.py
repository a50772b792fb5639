"""scripts/latent_probe.py: the probe finds a cell that the features hold linearly, and only there."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import latent_probe


def synthetic(n_tasks=40, per_task=30, dim=16, seed=0) -> dict:
    """Features that hold the key's coordinates (plus noise) where the key was visited, noise elsewhere."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 9, (n_tasks, 2)).astype(float)
    doors = rng.integers(0, 9, (n_tasks, 2)).astype(float)
    task = np.repeat(np.arange(n_tasks), per_task)
    visited = np.stack([rng.random(len(task)) < 0.7, np.zeros(len(task), dtype=bool)], axis=1)
    x = rng.normal(0, 1, (len(task), dim))
    x[visited[:, 0], :2] = keys[task[visited[:, 0]]] + rng.normal(0, 0.05, (visited[:, 0].sum(), 2))
    x[~visited[:, 0], :2] = 4.0
    cells = np.stack([keys[task], doors[task]], axis=1)
    return {"x": x, "cells": cells, "visited": visited, "task": task}


def test_probe_reads_a_linearly_held_cell_and_chance_stays_low():
    rows = {tuple(r.strip(" |").split(" | ")[:2]): r for r in latent_probe.report(synthetic(), alpha=1e-3, seed=0)[2:]}
    accuracy = lambda row, col: float(row.strip(" |").split(" | ")[col].rstrip("%")) / 100  # noqa: E731
    assert accuracy(rows[("key", "yes")], 3) > 0.5  # the probe finds the visited key (fitted on all rows)
    assert accuracy(rows[("key", "yes")], 4) < 0.1  # other rows' features do not
    assert accuracy(rows[("door", "no")], 3) < 0.2  # the door is in no feature
