"""CompressedAD (model/compressed.py) and its data path (dataset.py): CompressedADDataset
samples against the raw HDF5 arrays, BucketSampler / BucketBatches (one depth per batch,
every index once per epoch, reshuffling, DDP shards, workers, resume),
collate_compressed_batch (padding only within a stage), pad invariance of the encoder,
gradients through the last `grad_compression_rounds` rounds, LatentMemory rollouts
(cached = uncached, constant memory) and train.py end to end with model=CompressedAD.

Data: the tiny random-policy history of tests/fixtures_history.py (darkroom 5x5, 4 streams
of T=200 steps, stream 0 held out). Model: n_transit=40 (stages of 10..20 steps),
n_latent=4, max_compression_depth=2.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

import env as envs
import train
from dataset import BucketBatches, BucketSampler, CompressedADDataset, LazyPermutation, collate_compressed_batch
from fixtures_history import ALG, ENV, N_STREAM, T, build_history_file, cli_sets
from model import build, rollout as rollout_mod
from model.ad import KVCache, _cross_entropy
from model.compressed import split_compressed_batch
from model.compressed import CompressedAD, LatentMemory
from model.rollout import rollout, sample_actions
from utils import ConfigError, UserError, load_config, parse_set, run_path

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
    return {"state": envs.state_index(cfg, stream["states"][a:a + n]),
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


def sensitive_model(cfg, seed=0, grad_rounds=None) -> CompressedAD:
    """Random weights large enough that outputs depend strongly on every input (the default
    init is so small that a mask or position bug could hide in the noise)."""
    torch.manual_seed(seed)
    model = build(cfg, envs.model_inputs(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    if grad_rounds is not None:
        model.grad_rounds = grad_rounds
    return model.eval()


def flat(batches) -> list[int]:
    return [i for b in batches for i in b]


# ----------------------------------------------------------------------------- CompressedADDataset

def test_depth_buckets_cover_every_start_of_every_train_stream_once(small, raw):
    ds = small
    tasks = ds.tasks
    assert set(ds.depth_ranges()) == set(range(MAX_DEPTH + 1))
    lengths_seen = set()
    for d, r in ds.depth_ranges().items():
        n_starts = T - (d * STAGE + N_TRANSIT) + 1  # the deepest span must fit the stream
        assert len(r) == len(tasks) * len(TRAIN_STREAMS) * n_starts
        seen = []
        for i in r:
            assert ds.depth_of(i) == d
            s = ds[i]
            assert s["compression_depth"] == d and len(s["stages"]) == d
            for st in s["stages"]:
                assert STAGE // 2 <= len(st["state"]) <= STAGE
                lengths_seen.add(len(st["state"]))
            assert len(s["recent"]["state"]) == N_TRANSIT
            found = origins(raw, np.concatenate([p["action"] for p in all_steps(s)]))
            assert len(found) == 1, (i, found)
            seen.append(found[0])
        # every (task, train stream, start) of this depth exactly once, nothing else
        want = {(t, st, a) for t in tasks for st in TRAIN_STREAMS for a in range(n_starts)}
        assert len(seen) == len(set(seen)) and set(seen) == want, d
    assert lengths_seen == set(range(STAGE // 2, STAGE + 1))  # the whole documented range is used


@pytest.mark.parametrize("pick", ["first", "last", "random"])
def test_stages_and_recent_are_consecutive_steps_of_one_train_stream(data, raw, pick):
    _, cfg, path, train_tasks = data
    ds = CompressedADDataset(path, cfg)
    assert len(ds) == sum(len(train_tasks) * 3 * (T - (d * STAGE + N_TRANSIT) + 1) for d in range(MAX_DEPTH + 1))
    rng = np.random.default_rng(1)
    for d, r in ds.depth_ranges().items():
        index = {"first": r.start, "last": r.stop - 1, "random": int(rng.integers(r.start, r.stop))}[pick]
        s = ds[index]
        parts = all_steps(s)
        found = origins(raw, np.concatenate([p["action"] for p in parts]))
        assert len(found) == 1
        task, stream, a = found[0]
        assert task in train_tasks and stream in TRAIN_STREAMS
        if pick == "first":
            assert a == 0
        one = stream_of(raw, task, stream)
        for k, p in enumerate(parts):
            n = len(p["state"])
            if k < d:
                assert STAGE // 2 <= n <= STAGE
            want = expected_steps(cfg, one, a, n)
            for f in TOKEN_FIELDS:
                np.testing.assert_array_equal(p[f], want[f], err_msg=f"depth {d} part {k} {f}")
            a += n
        # the recent window follows the last stage directly
        if d:
            assert s["recent"]["prev_action"][0] == s["stages"][-1]["action"][-1]
        # a sample is the same every time it is read (its stage lengths are seeded by the index)
        again = ds[index]
        assert [len(p["state"]) for p in all_steps(again)] == [len(p["state"]) for p in parts]


def test_test_part_reads_only_the_held_out_stream(data, raw):
    _, cfg, path, train_tasks = data
    ds = CompressedADDataset(path, cfg, part="test", task_indices=train_tasks[:3])
    for d, r in ds.depth_ranges().items():
        for index in (r.start, r.stop - 1, (r.start + r.stop) // 2):
            s = ds[index]
            found = origins(raw, np.concatenate([p["action"] for p in all_steps(s)]))
            assert len(found) == 1 and found[0][1] == 0 and found[0][0] in train_tasks[:3]


def test_max_compression_depth_must_fit_the_streams(data):
    d, _, path, train_tasks = data
    deepest = (T - N_TRANSIT) // STAGE  # 8: 8 * 20 + 40 = 200 = T
    ok = CompressedADDataset(path, compressed_cfg(d, extra=[f"max_compression_depth={deepest}"]),
                             task_indices=train_tasks[:1])
    assert len(ok.depth_ranges()[deepest]) == 3  # one start per train stream
    s = ok[len(ok) - 1]
    assert s["compression_depth"] == deepest
    with pytest.raises(ConfigError, match=rf"max_compression_depth={deepest + 1}.*deepest that fits is {deepest}"):
        CompressedADDataset(path, compressed_cfg(d, extra=[f"max_compression_depth={deepest + 1}"]))
    # one step too long: stages of 67 steps, 1 * 67 + 134 = 201 = T + 1 (no start position left)
    with pytest.raises(ConfigError, match="max_compression_depth=1.*deepest that fits is 0"):
        CompressedADDataset(path, compressed_cfg(d, extra=["n_transit=134", "max_compression_depth=1"]))
    assert len(CompressedADDataset(path, compressed_cfg(d, extra=["n_transit=134", "max_compression_depth=0"]),
                                   task_indices=train_tasks[:1])) == 3 * (T - 134 + 1)


# ----------------------------------------------------------------------------- BucketSampler

@pytest.mark.parametrize("shuffle", [True, False])
def test_bucket_sampler_batches_hold_one_depth_and_every_index_once(small, shuffle):
    ds, bs = small, 50
    sampler = BucketSampler(ds, bs, shuffle=shuffle, seed=3)
    batches = list(sampler)
    assert len(sampler) == len(batches)
    for b in batches:
        assert 1 <= len(b) <= bs
        assert len({ds.depth_of(i) for i in b}) == 1, b
    assert sorted(flat(batches)) == list(range(len(ds)))  # drop_last=False: every index exactly once
    sizes = {d: len(r) for d, r in ds.depth_ranges().items()}
    assert all(n % bs for n in sizes.values())  # (each bucket has a partial batch here)
    assert len(batches) == sum(math.ceil(n / bs) for n in sizes.values())
    assert sum(len(b) < bs for b in batches) == len(sizes)  # only one partial batch per bucket
    depths = [ds.depth_of(b[0]) for b in batches]
    if shuffle:  # shuffled across buckets and within them
        assert depths != sorted(depths)
        assert any(b != list(range(b[0], b[0] + len(b))) for b in batches)
    else:
        assert flat(batches) == list(range(len(ds)))


def test_bucket_sampler_drop_last_keeps_full_batches_only(small):
    ds, bs = small, 50
    batches = list(BucketSampler(ds, bs, seed=3, drop_last=True))
    assert all(len(b) == bs and len({ds.depth_of(i) for i in b}) == 1 for b in batches)
    assert len(set(flat(batches))) == len(flat(batches)) == sum(len(r) // bs * bs for r in ds.depth_ranges().values())


def test_bucket_sampler_set_epoch_reshuffles_and_seed_decides(small):
    ds = small
    a = BucketSampler(ds, 50, seed=3)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    a.set_epoch(0)
    assert list(a) == e0  # same epoch and seed: same order
    assert e1 != e0 and sorted(flat(e1)) == list(range(len(ds)))
    # the batches themselves change (reshuffled within buckets), not only their order
    assert {frozenset(b) for b in e0} != {frozenset(b) for b in e1}
    b = BucketSampler(ds, 50, seed=3)  # a fresh sampler with the same seed: the same epochs
    assert list(b) == e0
    b.set_epoch(1)
    assert list(b) == e1
    other = BucketSampler(ds, 50, seed=4)
    assert list(other) != e0
    other.set_epoch(1)
    assert list(other) != e1


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("epoch", [0, 5])
def test_bucket_sampler_ddp_shards_are_disjoint_and_cover_the_epoch(small, world, epoch):
    ds = small
    full = BucketSampler(ds, 50, seed=3)
    full.set_epoch(epoch)
    whole = list(full)
    shards = []
    for r in range(world):
        s = BucketSampler(ds, 50, seed=3, rank=r, world_size=world)
        s.set_epoch(epoch)
        shards.append(list(s))
        assert len(s) == len(shards[-1])
    sets = [set(flat(b)) for b in shards]
    for i in range(world):
        for j in range(i + 1, world):
            assert not sets[i] & sets[j], (i, j)
    assert sorted(i for sh in shards for i in flat(sh)) == list(range(len(ds)))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert sum(map(len, shards)) == len(whole)
    for sh in shards:
        assert all(len({ds.depth_of(i) for i in b}) == 1 for b in sh)
    # each rank really gets its own share (not the whole epoch, not the same batches)
    assert all(len(sh) < len(whole) for sh in shards) and shards[0] != shards[1]


def test_bucket_sampler_with_dataloader_workers_gives_the_same_batches(data):
    _, cfg, path, train_tasks = data
    ds = CompressedADDataset(path, cfg, task_indices=train_tasks[2:3])
    sampler = BucketSampler(ds, 64, seed=7)
    kw = {"batch_sampler": sampler, "collate_fn": collate_with_indices}
    single = DataLoader(Indexed(ds), num_workers=0, **kw)
    multi = DataLoader(Indexed(ds), num_workers=2, persistent_workers=True, **kw)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        want = list(sampler)
        a_batches, b_batches = list(single), list(multi)
        assert [idx for _, idx in a_batches] == [idx for _, idx in b_batches] == want
        for (a, _), (b, _) in zip(a_batches, b_batches):
            assert a["num_compression_stages"] == b["num_compression_stages"]
            for sa, sb in zip(a["compression_stages"] + [a["recent"]], b["compression_stages"] + [b["recent"]]):
                assert sa.keys() == sb.keys()
                for k in sa:
                    assert torch.equal(sa[k], sb[k]), k
    assert sorted(flat(want)) == list(range(len(ds)))


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_bucket_batches_resume_equals_the_tail_of_an_uninterrupted_run(small, rank, world):
    make = lambda: BucketSampler(small, 50, seed=3, rank=rank, world_size=world)  # noqa: E731
    n = len(make())  # batches per epoch (on this rank)
    stop = 2 * n + 7  # into the third epoch
    whole = list(BucketBatches(make(), 0, stop))
    assert len(whole) == len(BucketBatches(make(), 0, stop)) == stop
    # epochs follow each other with set_epoch 0, 1, 2, ...
    per_epoch = []
    for e in range(3):
        s = make()
        s.set_epoch(e)
        per_epoch.append(list(s))
    assert whole == per_epoch[0] + per_epoch[1] + per_epoch[2][:7]
    assert per_epoch[0] != per_epoch[1]
    for start in (1, n - 1, n, n + 3, 2 * n, 2 * n + 6, stop):
        resumed = BucketBatches(make(), start, stop)
        assert len(resumed) == stop - start
        assert list(resumed) == whole[start:], start


def test_bucket_batches_with_no_batch_for_this_rank_stop_with_an_error(data):
    _, cfg, path, train_tasks = data
    ds = CompressedADDataset(path, cfg, task_indices=train_tasks[:1])
    sampler = BucketSampler(ds, 1000, seed=0, rank=3, world_size=4)  # 3 batches per epoch, 4 ranks
    assert len(sampler) == 0
    with pytest.raises(UserError, match="world_size=4"):
        next(iter(BucketBatches(sampler, 0, 5)))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_lazy_permutation_is_a_permutation_that_the_key_decides(n):
    perm = LazyPermutation(n, [3, 0])
    values = perm(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    assert [int(perm(i)[0]) for i in range(min(n, 50))] == values[:50].tolist()  # element by element
    if n >= 64:
        assert values.tolist() != list(range(n))
        assert LazyPermutation(n, [3, 1])(np.arange(n)).tolist() != values.tolist()
        assert LazyPermutation(n, [3, 0])(np.arange(n)).tolist() == values.tolist()


class HugeBuckets:
    """A dataset's depth buckets as large as a real one can get (10^11 windows), no data."""
    def depth_ranges(self):
        return {d: range(d * 10 ** 10, (d + 1) * 10 ** 10 - d) for d in range(10)}


def test_bucket_sampler_does_not_materialise_an_epoch():
    """The old sampler permuted every index of an epoch (442 M windows: 8 GB); this one
    must draw batches of a 10^11-window epoch in a few KB, across epochs and ranks."""
    import tracemalloc
    tracemalloc.start()
    sampler = BucketSampler(HugeBuckets(), 16, seed=0, rank=1, world_size=2)
    batches = list(BucketBatches(sampler, 10 ** 9, 10 ** 9 + 20))  # resumed deep into the run
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, peak
    assert len(sampler) == sum(-(-len(r) // 16) for r in HugeBuckets().depth_ranges().values()) // 2
    for b in batches:
        assert len(b) == 16 and len({i // 10 ** 10 for i in b}) == 1  # one depth each
    assert len({tuple(b) for b in batches}) == 20


# ----------------------------------------------------------------------------- collate

def test_bucketed_loader_batches_have_one_depth_and_stage_shapes_of_their_longest_stage(small):
    """The seed's verification: every batch's num_compression_stages is that of all its
    samples, and each stage tensor is (B, longest stage of the batch)."""
    sampler = BucketSampler(small, 8, seed=0)
    loader = DataLoader(Indexed(small), batch_sampler=sampler, collate_fn=collate_with_indices)
    depths = set()
    for n, (batch, idx) in enumerate(loader):
        if n == 60:
            break
        d = batch["num_compression_stages"]
        depths.add(d)
        assert {small.depth_of(i) for i in idx} == {d}
        assert len(batch["compression_stages"]) == d
        B = len(idx)
        for stage in batch["compression_stages"]:
            real = stage["mask"].sum(1)
            L = int(real.max())
            assert STAGE // 2 <= int(real.min()) and L <= STAGE
            for k, v in stage.items():
                assert v.shape == (B, L), k
        assert "mask" not in batch["recent"]
        for k, v in batch["recent"].items():
            assert v.shape == (B, N_TRANSIT), k
    assert depths == set(range(MAX_DEPTH + 1))


def test_collate_refuses_mixed_depths(small):
    r = small.depth_ranges()
    items = [small[r[1].start], small[r[2].start]]
    with pytest.raises(AssertionError, match="mixed compression depths"):
        collate_compressed_batch(items)
    with pytest.raises(AssertionError, match="mixed compression depths"):
        collate_compressed_batch([small[r[0].start], small[r[0].start + 1], small[r[1].start]])


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


def test_collate_pads_each_stage_to_its_own_longest_and_masks_real_steps(small):
    items = depth2_items_with_uneven_stages(small)
    batch = collate_compressed_batch(items)
    assert batch["num_compression_stages"] == 2
    for s, stage in enumerate(batch["compression_stages"]):
        lengths = [len(it["stages"][s]["state"]) for it in items]
        L = max(lengths)  # this stage's longest, not a global max over stages
        assert stage["mask"].dtype == torch.bool and stage["mask"].shape == (len(items), L)
        for row, (it, n) in enumerate(zip(items, lengths)):
            np.testing.assert_array_equal(stage["mask"][row].numpy(), np.arange(L) < n)
            for k, v in it["stages"][s].items():
                np.testing.assert_array_equal(stage[k][row, :n].numpy(), v, err_msg=k)
    assert batch["compression_stages"][0]["mask"].shape[1] != batch["compression_stages"][1]["mask"].shape[1]
    assert "mask" not in batch["recent"]
    for k in items[0]["recent"]:
        np.testing.assert_array_equal(batch["recent"][k].numpy(), np.stack([it["recent"][k] for it in items]))
    # depth 0: no stages, only the recent steps
    zero = collate_compressed_batch([small[i] for i in first_of_depth(small, 0, 3)])
    assert zero["num_compression_stages"] == 0 and zero["compression_stages"] == []
    assert zero["recent"]["state"].shape == (3, N_TRANSIT)


# ----------------------------------------------------------------------------- the model

def outputs(model, batch):
    with torch.no_grad():
        latents = model.latents_of(batch["compression_stages"])
        return latents, model.decode(latents, batch["recent"])


def with_garbage_in_padding(cfg, batch, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    highs = {"state": envs.n_state_tokens(cfg), "prev_action": envs.n_actions(cfg) + 1, "new_episode": 2,
             "action": envs.n_actions(cfg), "kind": 3, "next_kind": 3}
    out = dict(batch, compression_stages=[])
    for stage in batch["compression_stages"]:
        pad = ~stage["mask"]
        new = {k: v.clone() for k, v in stage.items()}
        for k, v in new.items():
            if k == "mask":
                continue
            if k == "prev_reward":
                noise = torch.rand(v.shape, generator=g) * 5 - 2
            else:
                noise = torch.randint(0, highs[k], v.shape, generator=g)
            v[pad] = noise[pad].to(v.dtype)
        out["compression_stages"].append(new)
    return out


@pytest.mark.parametrize("depth", [1, 2])
def test_outputs_do_not_depend_on_padding(data, small, depth):
    _, cfg, _, _ = data
    model = sensitive_model(cfg)
    items = depth2_items_with_uneven_stages(small) if depth == 2 else \
        [small[i] for i in first_of_depth(small, 1, 3)]
    batch = collate_compressed_batch(items)
    assert all((~st["mask"]).any() for st in batch["compression_stages"])  # there is padding
    latents, logits = outputs(model, batch)
    assert latents.shape == (len(items), N_LATENT, cfg["tf_n_embd"])
    assert logits.shape == (len(items), N_TRANSIT, envs.n_actions(cfg))
    # (1) other values at the padded positions: same latents, logits and loss
    garbage = with_garbage_in_padding(cfg, batch)
    assert any(not torch.equal(a["state"], b["state"])
               for a, b in zip(batch["compression_stages"], garbage["compression_stages"]))
    g_latents, g_logits = outputs(model, garbage)
    torch.testing.assert_close(g_latents, latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_logits, logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        _, loss = model(*split_compressed_batch(batch))
        _, g_loss = model(*split_compressed_batch(garbage))
    torch.testing.assert_close(g_loss, loss)
    # (2) each row alone (no padding) gives what it gave in the padded batch
    for row, it in enumerate(items):
        alone = collate_compressed_batch([it])
        assert all(st["mask"].all() for st in alone["compression_stages"])
        a_latents, a_logits = outputs(model, alone)
        torch.testing.assert_close(a_latents[0], latents[row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a_logits[0], logits[row], atol=1e-5, rtol=1e-5)
    # the check is not vacuous: other values at the *real* stage steps change the latents and logits
    real = dict(batch, compression_stages=[{k: v.clone() for k, v in st.items()} for st in batch["compression_stages"]])
    last = real["compression_stages"][-1]
    last["state"][last["mask"]] = (last["state"][last["mask"]] + 7) % envs.n_state_tokens(cfg)
    r_latents, r_logits = outputs(model, real)
    assert (r_latents - latents).abs().max() > 1e-2 and (r_logits - logits).abs().max() > 1e-3


@pytest.mark.parametrize("depth", range(MAX_DEPTH + 1))
def test_forward_backward_at_every_depth(data, small, depth):
    _, cfg, _, _ = data
    torch.manual_seed(0)
    model = build(cfg, envs.model_inputs(cfg))
    batch = collate_compressed_batch([small[i] for i in first_of_depth(small, depth, 4, offset=5)])
    tokens, targets = split_compressed_batch(batch)
    logits, loss = model(tokens, targets)
    metrics = model.metrics(tokens, logits, targets)
    assert torch.isfinite(loss) and 0.5 < loss.item() < 3.0  # about ln 5 untrained
    assert metrics["compression_depth"] == depth and 0.0 <= metrics["acc_action"] <= 1.0
    loss.backward()
    assert model.action_head.weight.grad is not None and model.action_head.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    enc = dict(model.encoder.named_parameters())
    if depth == 0:
        assert all(p.grad is None for p in enc.values())
    else:
        for name, p in enc.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert enc["queries"].grad.abs().sum() > 0
        assert enc["blocks.0.attn.qkv.weight"].grad.abs().sum() > 0


def grads_of(model, loss_fn) -> dict:
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def manual_loss(model, batch, detach_before: int):
    """Decoder loss with the latents of rounds < detach_before detached (the reference)."""
    latents = None
    for i, st in enumerate(batch["compression_stages"]):
        latents = model.compress(latents, st, st["mask"])
        if i + 1 < detach_before:
            latents = latents.detach()
    logits = model.decode(latents, batch["recent"])
    return _cross_entropy(logits, batch["recent"]["action"])


def assert_same_grads(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        if a[n] is None or b[n] is None:
            assert a[n] is None and b[n] is None or (a[n] if a[n] is not None else b[n]).abs().sum() == 0, n
        else:
            torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5, msg=n)


def test_gradients_flow_through_the_last_grad_compression_rounds_only(data, small):
    _, cfg, _, _ = data
    model = sensitive_model(cfg, grad_rounds=1).train()
    batch = collate_compressed_batch(depth2_items_with_uneven_stages(small))
    fwd = lambda: model(*split_compressed_batch(batch))[1]  # noqa: E731
    one_round = grads_of(model, fwd)
    detached = grads_of(model, lambda: manual_loss(model, batch, detach_before=2))  # round 0 detached
    full = grads_of(model, lambda: manual_loss(model, batch, detach_before=0))      # nothing detached
    assert_same_grads(one_round, detached)
    assert one_round["encoder.queries"].abs().sum() > 0
    # gradients through round 0 would change the encoder's gradients (the check can fail)
    assert not torch.allclose(full["encoder.queries"], detached["encoder.queries"], atol=1e-6)
    # and with grad_compression_rounds=2 they do flow through both rounds
    model.grad_rounds = 2
    assert_same_grads(grads_of(model, fwd), full)


# ----------------------------------------------------------------------------- rollouts

def recorded_rollout(monkeypatch, model, cfg, use_cache, n_episodes, n_rollouts=2, seed=5):
    """rollout() plus the logits and actions of every step, and the LatentMemory used."""
    logits_log, actions_log, memories = [], [], []

    def recording(logits, uniforms, greedy, temperature=1.0):
        actions = sample_actions(logits, uniforms, greedy, temperature)
        logits_log.append(logits.clone())
        actions_log.append(actions.copy())
        return actions

    real_init = LatentMemory.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        memories.append(self)

    tasks = envs.tasks_of_split(cfg, "test")
    with monkeypatch.context() as m:
        m.setattr(rollout_mod, "sample_actions", recording)
        m.setattr(LatentMemory, "__init__", init)
        returns, stats = rollout(model, cfg, tasks, n_episodes, n_rollouts, seed=seed, use_cache=use_cache)
    assert returns.shape == (len(tasks) * n_rollouts, n_episodes) and len(memories) == 1
    return returns, stats, torch.stack(logits_log), np.stack(actions_log), memories[0]


def depth_after(steps: int) -> int:
    """Compressions after `steps` steps: the first when step n_transit + 1 arrives, then one
    every stage_len steps."""
    return max(0, math.ceil((steps - N_TRANSIT) / STAGE))


def test_cached_latent_memory_rollout_equals_uncached(data, monkeypatch):
    _, cfg, _, _ = data
    model = sensitive_model(cfg)
    n_episodes = 12  # 120 steps: 4 compressions (deeper than the deepest trained depth)
    r1, s1, l1, a1, m1 = recorded_rollout(monkeypatch, model, cfg, True, n_episodes)
    r0, s0, l0, a0, m0 = recorded_rollout(monkeypatch, model, cfg, False, n_episodes)
    steps = n_episodes * cfg["horizon"]
    assert l1.shape[0] == steps
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(a1, a0)
    np.testing.assert_array_equal(r1, r0)
    assert s1 == s0
    assert s1["compression_depth_reached"] == depth_after(steps) == 4
    assert m1.cache is not None and m0.cache is None
    torch.testing.assert_close(m1.latents, m0.latents, atol=1e-4, rtol=1e-4)
    # the policy is context-dependent (same start state, other context -> other logits)
    assert not torch.allclose(l1[0], l1[cfg["horizon"]])


def test_rollout_latents_are_the_training_fold_of_the_oldest_stages(data, monkeypatch):
    """What LatentMemory holds after a rollout is what training computes for the same steps:
    latents_of(stages of stage_len oldest steps, oldest first), then decode(latents, recent)."""
    _, cfg, _, _ = data
    model = sensitive_model(cfg)
    tokens = []
    real_step = LatentMemory.step

    def step(self, token):
        tokens.append({k: v.clone() for k, v in token.items()})
        return real_step(self, token)

    monkeypatch.setattr(LatentMemory, "step", step)
    _, stats, logits, _, mem = recorded_rollout(monkeypatch, model, cfg, True, n_episodes=9, n_rollouts=1)
    steps = 9 * cfg["horizon"]  # 90 steps: stages 0..19, 20..39, 40..59; recent 60..89
    assert stats["compression_depth_reached"] == mem.depth == 3
    cat = lambda ts: {k: torch.cat([t[k] for t in ts], 1) for k in ts[0]}  # noqa: E731
    stages = []
    for i in range(3):
        st = cat(tokens[i * STAGE:(i + 1) * STAGE])
        st["mask"] = torch.ones_like(st["state"], dtype=torch.bool)
        stages.append(st)
    with torch.no_grad():
        latents = model.latents_of(stages)
        last = model.decode(latents, cat(tokens[3 * STAGE:steps]))[:, -1]
    torch.testing.assert_close(mem.latents, latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[-1], last, atol=1e-4, rtol=1e-4)


def test_compression_depth_grows_with_episodes(data, monkeypatch):
    _, cfg, _, _ = data
    model = sensitive_model(cfg)
    reached = []
    for n_episodes in (3, 5, 8):
        _, stats, _, _, mem = recorded_rollout(monkeypatch, model, cfg, True, n_episodes, n_rollouts=1)
        assert stats["compression_depth_reached"] == mem.depth == depth_after(n_episodes * cfg["horizon"])
        reached.append(stats["compression_depth_reached"])
    assert reached == [0, 1, 2]


def test_rollout_memory_does_not_grow_with_the_history(data, monkeypatch):
    _, cfg, _, _ = data
    model = sensitive_model(cfg)
    peaks, seen = {}, []
    real_update = KVCache.update

    def update(self, layer, k, v):
        out = real_update(self, layer, k, v)
        seen.append(self.length + k.shape[2])
        return out

    results = {}
    for n_episodes in (6, 24):  # 60 and 240 steps
        seen.clear()
        with monkeypatch.context() as m:
            m.setattr(KVCache, "update", update)
            _, stats, _, _, mem = recorded_rollout(monkeypatch, model, cfg, True, n_episodes, n_rollouts=1)
        peaks[n_episodes] = max(seen)
        results[n_episodes] = (stats, mem.cache.capacity, tuple(mem.cache.k.shape), tuple(mem.latents.shape))
    (short, cap_s, shape_s, lat_s), (long, cap_l, shape_l, lat_l) = results[6], results[24]
    assert long["compression_depth_reached"] == depth_after(240) == 10 > short["compression_depth_reached"] == 1
    for stats in (short, long):
        assert stats["max_context_tokens"] <= N_LATENT + N_TRANSIT
    assert short["max_context_tokens"] == long["max_context_tokens"] == N_LATENT + N_TRANSIT
    assert cap_s == cap_l == N_LATENT + N_TRANSIT and shape_s == shape_l and lat_s == lat_l
    assert peaks[6] == peaks[24] == N_LATENT + N_TRANSIT  # tokens ever held in the cache


# ----------------------------------------------------------------------------- train.py

def scalars(run_dir: Path) -> dict:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    d, _, _, _ = data
    runs = tmp_path_factory.mktemp("compressed_runs")
    cfg = compressed_cfg(d, runs, extra=["eval_episodes=6"])
    return cfg, train.train(cfg)


def test_train_compressed_ad_end_to_end(data, trained):
    _, _, path, _ = data
    cfg, run_dir = trained
    import yaml
    assert run_dir == run_path(cfg) and run_dir.name == "CompressedAD-darkroom-seed0"
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == cfg
    state = torch.load(run_dir / "ckpt-last.pt", weights_only=True)
    assert state["step"] == STEPS and {"model", "optimizer", "torch_rng"} <= set(state)
    assert "encoder.queries" in state["model"]
    tags = scalars(run_dir)
    want = {"train/loss_action", "train/acc_action", "train/compression_depth", "train/lr",
            "test/loss_action", "eval/return_first", "eval/return_final"}
    assert want <= set(tags), sorted(want - set(tags))
    assert [s for s, _ in tags["train/loss_action"]] == list(range(2, STEPS + 1, 2))
    for _, v in tags["train/loss_action"] + tags["test/loss_action"]:
        assert 0.5 < v < 3.0
    # the logged depth is the depth of that step's batch, as BucketBatches draws them
    ds = CompressedADDataset(path, cfg)
    batches = list(BucketBatches(BucketSampler(ds, cfg["train_batch_size"], seed=cfg["seed"]), 0, STEPS))
    for s, v in tags["train/compression_depth"]:
        assert v == ds.depth_of(batches[s - 1][0])
    assert {ds.depth_of(b[0]) for b in batches} != {0}  # the run trained through the encoder
    # the encoder was trained (its parameters moved away from their initialisation)
    torch.manual_seed(cfg["seed"])
    init = build(cfg, envs.model_inputs(cfg)).state_dict()
    assert not torch.equal(init["encoder.queries"], state["model"]["encoder.queries"])


class Killed(Exception):
    pass


def test_train_compressed_ad_resume_is_exact(data, trained, tmp_path, monkeypatch):
    d, _, _, _ = data
    cfg_a, run_a = trained
    cfg_b = compressed_cfg(d, tmp_path / "B", extra=["eval_episodes=6"])
    real_lr_at = train.lr_at

    def dying_lr_at(step, c):
        if step == 6:
            raise Killed
        return real_lr_at(step, c)

    with monkeypatch.context() as m:
        m.setattr(train, "lr_at", dying_lr_at)
        with pytest.raises(Killed):
            train.train(cfg_b)
    assert torch.load(run_path(cfg_b) / "ckpt-last.pt", weights_only=True)["step"] == 4  # ckpt_interval=4
    train.train(cfg_b)
    a = torch.load(run_a / "ckpt-last.pt", weights_only=True)
    b = torch.load(run_path(cfg_b) / "ckpt-last.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, sa in a["optimizer"]["state"].items():
        for k in sa:
            assert torch.equal(sa[k], b["optimizer"]["state"][pid][k]), (pid, k)
