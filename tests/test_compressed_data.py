"""CompressedAD's data path (dataset.py): CompressedADDataset samples against the raw HDF5
arrays, BucketSampler / BucketBatches (one depth per batch, every index once per epoch,
reshuffling, DDP shards, workers, resume) and collate_compressed_batch (padding only within
a stage). Set-up in compressed_helpers.py.
"""
import math

import numpy as np
import pytest
import torch
from compressed_helpers import (  # noqa: F401 - fixtures
    MAX_DEPTH,
    N_TRANSIT,
    STAGE,
    TOKEN_FIELDS,
    TRAIN_STREAMS,
    Indexed,
    T,
    all_steps,
    collate_with_indices,
    compressed_cfg,
    data,
    depth2_items_with_uneven_stages,
    expected_steps,
    first_of_depth,
    flat,
    origins,
    raw,
    small,
    stream_of,
)
from torch.utils.data import DataLoader

from dataset import BucketBatches, BucketSampler, CompressedADDataset, LazyPermutation, collate_compressed_batch
from errors import ConfigError, UserError

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


def test_episode_stride_stages_and_recent_are_consecutive_steps_of_a_subsampled_stream(data, raw):
    """With episode_stride=2 a sample's stages and recent window are consecutive steps of
    episodes offset, offset + 2, ... of one train stream (10-step episodes in the fixture)."""
    d_, _, path, train_tasks = data
    cfg = compressed_cfg(d_, d_ / "runs", extra=["episode_stride=2"])
    ds = CompressedADDataset(path, cfg, task_indices=train_tasks[:2])
    virtual_T, horizon = T // 2, cfg["horizon"]
    assert ds.T == virtual_T and len(ds.streams) == 2 * len(TRAIN_STREAMS)
    for d, r in ds.depth_ranges().items():
        for index in (r.start, r.stop - 1):
            parts = all_steps(ds[index])
            actions = np.concatenate([p["action"] for p in parts])
            matches = []
            for task in train_tasks[:2]:
                for stream in TRAIN_STREAMS:
                    for offset in (0, 1):
                        one = stream_of(raw, task, stream)
                        steps = ((np.arange(virtual_T) // horizon) * 2 + offset) * horizon + np.arange(virtual_T) % horizon
                        view = {k: v[steps] for k, v in one.items()}
                        for a in range(virtual_T - len(actions) + 1):
                            if np.array_equal(view["actions"][a:a + len(actions)], actions):
                                matches.append((view, a))
            assert len(matches) == 1, (d, index)
            view, a = matches[0]
            for k, p in enumerate(parts):
                want = expected_steps(cfg, view, a, len(p["state"]))
                for f in TOKEN_FIELDS:
                    np.testing.assert_array_equal(p[f], want[f], err_msg=f"depth {d} part {k} {f}")
                a += len(p["state"])


def test_test_part_reads_only_the_held_out_stream(data, raw):
    _, cfg, path, train_tasks = data
    ds = CompressedADDataset(path, cfg, part="test", task_indices=train_tasks[:3])
    for _d, r in ds.depth_ranges().items():
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
