"""Shared set-up of the CompressedAD tests (test_compressed_data.py, test_compressed_model.py).

Data: the tiny random-policy history of tests/fixtures_history.py (darkroom 5x5, 4 streams
of T=200 steps, stream 0 held out). Model: n_transit=40 (stages of 10..20 steps),
n_latent=4, max_compression_depth=2.
"""
from pathlib import Path

import numpy as np
import pytest
from fixtures_history import ALG, ENV, N_STREAM, T, build_history_file, cli_sets
from model_helpers import sensitive_model

import env as envs
from cli import load_config
from config.loading import parse_set
from dataset import CompressedADDataset, collate_compressed_batch
from model.compressed import CompressedAD

ROOT = Path(__file__).resolve().parents[1]
MODEL_COMPRESSED = ROOT / "config/model/ad_compressed_dr.yaml"
N_TRANSIT, N_LATENT, MAX_DEPTH = 40, 4, 2
STAGE = N_TRANSIT // 2  # 20: stages of 10..20 steps
STEPS = 8  # train_timesteps of the tiny run
COMPRESSED_SETS = [f"n_transit={N_TRANSIT}", f"n_latent={N_LATENT}", "enc_n_layer=1",
                   f"max_compression_depth={MAX_DEPTH}", "grad_compression_rounds=1", f"train_timesteps={STEPS}"]
TOKEN_FIELDS = ("state", "prev_action", "prev_reward", "new_episode", "action")
TRAIN_STREAMS = {1, 2, 3}  # stream 0 of 4 is held out (test_stream_ratio=0.25)


def compressed_cfg(data_dir, run_dir=None, extra=()) -> dict:
    """The resolved config of a tiny CompressedAD run, through the scripts' loader."""
    sets = cli_sets(data_dir, run_dir, extra=COMPRESSED_SETS + list(extra))
    return load_config([ALG, ENV, MODEL_COMPRESSED], parse_set(sets))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("compressed_data")
    cfg = compressed_cfg(d, d / "runs")
    path = build_history_file(cfg)
    train_tasks = envs.tasks_of_split(cfg, "train")
    return d, cfg, path, train_tasks


@pytest.fixture(scope="module")
def small(data):
    """A two-task CompressedADDataset (3 train streams each): 6 * (161 + 141 + 121) samples."""
    _, cfg, path, train_tasks = data
    return CompressedADDataset(path, cfg, task_indices=train_tasks[:2])


@pytest.fixture(scope="module")
def raw(data):
    """All tasks' raw arrays straight from the file, and an index of 20-action windows."""
    import h5py
    _, _, path, _ = data
    with h5py.File(path, "r") as f:
        arrays = {int(g): {k: f[g][k][()] for k in ("states", "actions", "rewards", "dones")} for g in f}
    where = {}
    for task, a in arrays.items():
        for s in range(N_STREAM):
            acts = a["actions"][:, s].astype(np.int64)
            for start in range(T - 20 + 1):
                where.setdefault(acts[start:start + 20].tobytes(), []).append((task, s, start))
    return arrays, where


def stream_of(raw, task, stream) -> dict:
    return {k: v[:, stream] for k, v in raw[0][task].items()}


def origins(raw, actions: np.ndarray) -> list[tuple]:
    """Every (task, stream, start) of the file where this action sequence occurs."""
    arrays, where = raw
    actions = np.asarray(actions, dtype=np.int64)
    out = []
    for task, s, start in where.get(actions[:20].tobytes(), []):
        if start + len(actions) <= T and np.array_equal(arrays[task]["actions"][start:start + len(actions), s], actions):
            out.append((task, s, start))
    return out


def expected_steps(cfg, stream: dict, a: int, n: int) -> dict:
    """The documented token fields of steps a..a+n-1 of one stream, from the raw arrays."""
    t = np.arange(a, a + n)
    prev, first = np.maximum(t - 1, 0), t == 0
    return {"state": envs.state_token(cfg, stream["states"][a:a + n]),
            "prev_action": np.where(first, envs.n_actions(cfg), stream["actions"][prev]),
            "prev_reward": np.where(first, 0.0, stream["rewards"][prev]),
            "new_episode": np.where(first, 1, stream["dones"][prev].astype(np.int64)),
            "action": stream["actions"][a:a + n]}


def all_steps(sample: dict) -> list[dict]:
    return sample["stages"] + [sample["recent"]]


def first_of_depth(ds, d, n, offset=0) -> list[int]:
    r = ds.depth_ranges()[d]
    return list(range(r.start + offset, r.start + offset + n))


class Indexed:
    """A dataset that also hands back each sample's index (to see which indices a loader read)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i] | {"index": int(i)}


def collate_with_indices(items):
    return collate_compressed_batch(items), [it["index"] for it in items]


def sensitive_compressed_model(cfg, seed=0, grad_rounds=None) -> CompressedAD:
    """model_helpers.sensitive_model in eval mode, optionally with gradients through another
    number of compression rounds."""
    model = sensitive_model(cfg, seed)
    if grad_rounds is not None:
        model.grad_rounds = grad_rounds
    return model.eval()


def flat(batches) -> list[int]:
    return [i for b in batches for i in b]


def depth2_items_with_uneven_stages(ds, n=3) -> list[dict]:
    """n depth-2 samples whose longest first stage and longest second stage differ, and
    whose stage lengths differ within each stage."""
    r = ds.depth_ranges()[2]
    for start in range(r.start, r.stop - n):
        items = [ds[i] for i in range(start, start + n)]
        L = np.array([[len(st["state"]) for st in it["stages"]] for it in items])  # (n, 2)
        if L[:, 0].max() != L[:, 1].max() and (L.min(0) < L.max(0)).all():
            return items
    raise AssertionError("no such samples")
