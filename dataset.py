"""Training samples from a learning-history file.

`ADDataset` serves windows of one stream of one training task as token dicts (see
model/ad.py for the token fields):
- standard mode: `n_transit` consecutive steps;
- compressed mode (`use_compressed_context`): [<compress>, region k-1, </compress>,
  <compress>, region k, </compress>], i.e. the previous full rollout region and the
  current one. With causal attention each step token of region k sees exactly what the
  two-region evaluation shows the model at that step, so one sample supervises every
  query position of the region (and region k-1's tokens play the "no previous region yet"
  case of the first rollout). With `episode_stride` k the earlier region is instead the
  rollout that started k episodes before the current one (`region_gap` rollouts earlier), so
  the pair spans as much of the source's learning as a strided AD window.

Memory is bounded by the model, not the dataset: windows are read from the file on
demand (with DataLoader workers or without), through a handful of open tasks (`_Tasks`,
least recently used first out) with a small chunk cache each; the held-out streams are
read only when a test batch needs them; and `BucketSampler` computes each batch from a
lazy permutation instead of holding an epoch's indices. The file is opened lazily in the
process that reads it, so DataLoader workers each get their own handle.
"""
import math
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import torch

import env as envs
from algorithm import history
from config.loading import collection_keys
from errors import ConfigError, UserError
from tokens import concat_tokens, region_tokens, window_tokens

FIELDS = ("states", "actions", "rewards", "dones")


def check_dataset_matches(path: Path, header: dict, cfg: dict):
    stored = header["collection_config"]
    diff = [f"{k}={stored.get(k, 'missing')!r} (asked {cfg[k]!r})" for k in collection_keys(cfg)
            if stored.get(k) != cfg[k]]
    if diff:
        raise ConfigError(f"{path} was collected with other settings: {', '.join(diff)}; "
                          "use the env and algorithm configs the data was collected with (a file from before "
                          "the validation split has no val_env_ratio: collect it again)")
    # (compress_interval needs no check of its own: the config requires it to equal n_steps,
    # which is compared with the file above)
    if header["split"] != envs.task_split(cfg):  # the stored split is the one training must respect
        raise ConfigError(f"{path} stores a train/val/test split that differs from the one its settings "
                          "give: the file was made by other code; collect it again into another dataset_dir")


class ADDataset:
    """Windows of learning histories: `part` 'train' (the training tasks' training streams),
    'test' (their held-out streams) or 'val' (every stream of the validation tasks, for held-out
    losses where a task has too few streams to hold some out); `two_region` picks two-region
    samples (default: the config's use_compressed_context)."""

    def __init__(self, path, cfg: dict, part: str = "train", task_indices=None, in_memory=False,
                 two_region: bool | None = None):
        self.path, self.cfg, self.part = Path(path), cfg, part
        header = history.read_header(self.path)
        check_dataset_matches(self.path, header, cfg)
        split = header["split"]
        kind = "val" if part == "val" else "train"  # never a test task
        self.tasks = list([i for i, s in enumerate(split) if s == kind] if task_indices is None else task_indices)
        held_out = [i for i in self.tasks if split[i] != kind]
        if held_out and kind == "train":
            raise UserError(f"tasks {held_out} are held-out (validation or test) tasks; training must never see them")
        if held_out:
            raise UserError(f"tasks {held_out} are not validation tasks")
        if not self.tasks:
            raise ConfigError(f"the data has no {kind} task; raise val_env_ratio, or hold out streams of the "
                              "training tasks for the test/ losses (test_stream_ratio > 0)" if kind == "val" else
                              f"the data has no {kind} task; raise train_env_ratio")
        missing = sorted(set(self.tasks) - set(header["done"]))
        if missing:
            raise UserError(f"{self.path} lacks {len(missing)} training tasks (e.g. {missing[:5]}): "
                            "rerun the same collect.py command to finish it")
        damaged = history.damaged_tasks(self.path, header, self.tasks)  # before training, not in the middle
        if damaged:
            raise UserError(f"{self.path} has damaged tasks ({history.describe(damaged)}): rerun the same "
                            "collect.py command to collect them again")
        S = header["collection_config"]["n_stream"]
        n_test = int(round(cfg["test_stream_ratio"] * S)) if part != "val" else 0
        self.streams = list(range(n_test)) if part == "test" else list(range(n_test, S))
        if not self.streams:
            raise ConfigError(f"no {part} streams: n_stream={S}, test_stream_ratio={cfg['test_stream_ratio']}; "
                              "set test_stream_ratio so that both parts get at least one stream, or to 0 to take "
                              "the test/ losses from the validation tasks")
        with h5py.File(self.path, "r") as f:
            first = f[str(self.tasks[0])]
            self.T = first["actions"].shape[0]
            has_markers = "compress_markers" in first
            markers = first["compress_markers"][:, 0] if has_markers else None
            dones = first["dones"][:, self.streams[0]]
        self.stride = cfg["episode_stride"]
        self.two_region = cfg["use_compressed_context"] if two_region is None else two_region
        if self.two_region and not has_markers:
            warnings.warn(f"{self.path} has no compress_markers: FALLING BACK TO STANDARD AD WINDOWS "
                          "(use_compressed_context is ignored for this data)", stacklevel=2)
            self.two_region = False
        self.region_gap = 1  # a two-region sample is region k - region_gap and region k
        if self.stride > 1:
            self.episode_len, subsampled_T = subsampled_length(self.path, dones, self.stride)
            if self.two_region:
                self.region_gap = region_gap(self.stride, self.episode_len, cfg["compress_interval"])
            else:
                self.T = subsampled_T
                self.streams = [(s, o) for s in self.streams for o in range(self.stride)]
        if self.two_region:
            self.region_starts = np.flatnonzero(markers == history.MARK_START)
            self.region_ends = np.flatnonzero(markers == history.MARK_END) + 1
            self.per_stream = len(self.region_starts) - self.region_gap
        else:
            if cfg["n_transit"] > self.T:
                raise ConfigError(f"n_transit={cfg['n_transit']} is longer than a stream ({self.T} steps"
                                  f"{self.stride_note()})")
            self.per_stream = self.T - cfg["n_transit"] + 1
        if self.per_stream < 1:
            gap = (f" (two regions {self.region_gap} rollouts apart for episode_stride={self.stride})"
                   if self.region_gap > 1 else "")
            raise UserError(f"{self.path}: streams of {self.T} steps are too short for a sample{gap}")
        self.in_memory = in_memory  # every task read at once: only for small files (tests)
        self._data, self._pid = None, None

    def __len__(self):
        return len(self.tasks) * len(self.streams) * self.per_stream

    def _load(self):
        """{task: {field: array-like}}: arrays (in_memory) or the file's datasets, read on
        demand; opened once per process (a DataLoader worker opens its own)."""
        if self._pid == os.getpid():
            return self._data
        if self.in_memory:
            with h5py.File(self.path, "r") as f:
                self._data = {i: {k: f[str(i)][k][()] for k in FIELDS} for i in self.tasks}
        else:
            self._data = _Tasks(self.path, self.cfg["data_cache_mb"] * 2**20)
        self._pid = os.getpid()
        return self._data

    def data_mb(self) -> float:
        """What holding every task of this dataset in memory takes (data_cache_mb)."""
        with h5py.File(self.path, "r") as f:
            first = f[str(self.tasks[0])]
            per_task = sum(first[k].size * first[k].dtype.itemsize for k in FIELDS)
        return per_task * len(self.tasks) / 2**20

    def reading_hint(self) -> str | None:
        """A line for users whose tasks outnumber the open ones the file path keeps."""
        if self.cfg["data_cache_mb"] or self.in_memory or len(self.tasks) <= _Tasks.KEEP:
            return None
        return (f"note: windows of {len(self.tasks)} tasks are read from the file through {_Tasks.KEEP} open "
                f"ones; --set data_cache_mb={int(self.data_mb()) + 1} holds them in memory instead (faster)")

    def stride_note(self) -> str:
        """For error messages about stream lengths: the length is the subsampled one."""
        return f" after episode_stride={self.stride}" if self.stride > 1 else ""

    def stream_view(self, task: int, stream):
        """One stream of one task, or with episode_stride k, (stream, offset): its episodes
        offset, offset + k, offset + 2k, ... one after another."""
        arrays = self._load()[task]
        if self.stride == 1:
            return _StreamView(arrays, stream)
        return _SubsampledView(arrays, *stream, self.stride, self.episode_len)

    def locate(self, index: int) -> tuple[int, int, int]:
        """index -> (task, stream, position): window start, or the earlier region's index in
        two-region mode; with episode_stride (standard mode) the stream is (stream, offset),
        see stream_view."""
        per_task = len(self.streams) * self.per_stream
        task, rest = divmod(index, per_task)
        stream, pos = divmod(rest, self.per_stream)
        return self.tasks[task], self.streams[stream], pos

    def __getitem__(self, index: int) -> dict:
        task, stream, pos = self.locate(int(index))
        if not self.two_region:
            return window_tokens(self.cfg, self.stream_view(task, stream), pos, pos + self.cfg["n_transit"])
        one = _StreamView(self._load()[task], stream)  # regions are read from the real stream
        k = pos + self.region_gap
        parts = (region_tokens(self.cfg, one, self.region_starts[pos], self.region_ends[pos])
                 + region_tokens(self.cfg, one, self.region_starts[k], self.region_ends[k]))
        return concat_tokens(parts)


class _Tasks:
    """task -> {field: array-like}, within a memory budget however many tasks the file has.

    With a budget of 0 (the default `data_cache_mb`) windows are read from the file through
    the h5py datasets of at most KEEP open tasks, each with a CHUNK_CACHE of decompressed
    chunks. With a budget (MB per loader process) whole tasks are read into memory on first
    use and kept, the least recently used going first when it is spent: measured 1.2x
    CompressedAD's targets/s at 400 tasks once warm, for 190 MB (bench/train_memory.py)."""
    KEEP, CHUNK_CACHE = 64, 64 * 1024

    def __init__(self, path: Path, cache_bytes: int):
        self.file = h5py.File(path, "r", rdcc_nbytes=self.CHUNK_CACHE)
        self.cache_bytes, self.open, self.sizes = cache_bytes, OrderedDict(), {}

    def __getitem__(self, task: int) -> dict:
        if task in self.open:
            self.open.move_to_end(task)
            return self.open[task]
        group = self.file[str(task)]
        if self.cache_bytes:
            self.open[task] = {k: group[k][()] for k in FIELDS}
            self.sizes[task] = sum(a.nbytes for a in self.open[task].values())
        else:
            self.open[task] = {k: group[k] for k in FIELDS}
            self.sizes[task] = 0
        while len(self.open) > 1 and (sum(self.sizes.values()) > self.cache_bytes if self.cache_bytes
                                      else len(self.open) > self.KEEP):
            old, _ = self.open.popitem(last=False)
            del self.sizes[old]
        return self.open[task]


class _StreamView:
    """field[a:b] of one stream, without reading the other streams."""

    def __init__(self, arrays: dict, stream: int):
        self.arrays, self.stream = arrays, stream

    def __getitem__(self, field):
        return _Column(self.arrays[field], self.stream)


class _Column:
    def __init__(self, array, stream):
        self.array, self.stream = array, stream

    def __getitem__(self, sl: slice):
        return self.array[sl, self.stream]


def subsampled_length(path: Path, dones: np.ndarray, stride: int) -> tuple[int, int]:
    """(episode length, steps of one subsampled stream) for episode_stride; the episodes of
    a stream must all have one length (read from the first stream's dones)."""
    ends = np.flatnonzero(dones) + 1
    length = int(ends[0]) if len(ends) else 0
    if not len(ends) or np.any(ends != length * np.arange(1, len(ends) + 1)):
        raise ConfigError(f"episode_stride={stride} needs streams of equal-length episodes, and {path}'s are "
                          "not; use episode_stride=1")
    if len(dones) % length:
        raise ConfigError(f"episode_stride={stride} needs streams of whole episodes, and {path}'s end inside an "
                          f"episode ({len(dones)} steps, episodes of {length}); use episode_stride=1")
    n_episodes = len(dones) // length
    if n_episodes < stride:
        raise ConfigError(f"episode_stride={stride} is more than the {n_episodes} episodes of a stream in {path}")
    return length, (n_episodes // stride) * length


def region_gap(stride: int, episode_len: int, interval: int) -> int:
    """Rollout regions between the two regions of a two-region sample whose rollouts start
    `stride` episodes apart (1 for stride 1: consecutive rollouts); the stride must be a whole
    number of rollouts."""
    if stride == 1:
        return 1
    if stride * episode_len % interval:
        raise ConfigError(f"episode_stride={stride} with use_compressed_context=true needs {stride} episodes "
                          f"({stride * episode_len} steps) to be a whole number of rollouts of "
                          f"compress_interval={interval} steps; pick a stride that is a multiple of "
                          f"{interval // math.gcd(episode_len, interval)} or use episode_stride=1")
    return stride * episode_len // interval


class _SubsampledView:
    """Episodes offset, offset + stride, ... of one stream as one stream: step v of the view is
    step v % L of episode offset + (v // L) * stride. The step before each episode is the end
    of the previous one shown, so the tokens see a finished episode there, as in the data."""

    def __init__(self, arrays: dict, stream: int, offset: int, stride: int, episode_len: int):
        self.arrays, self.stream = arrays, stream
        self.offset, self.stride, self.L = offset, stride, episode_len

    def real_steps(self, a: int, b: int) -> np.ndarray:
        v = np.arange(a, b)
        return (self.offset + (v // self.L) * self.stride) * self.L + v % self.L

    def __getitem__(self, field):
        return _SubsampledColumn(self, self.arrays[field])


class _SubsampledColumn:
    def __init__(self, view: _SubsampledView, array):
        self.view, self.array = view, array

    def __getitem__(self, sl: slice):
        real = self.view.real_steps(sl.start or 0, sl.stop)
        span = self.array[real[0]:real[-1] + 1, self.view.stream]  # one contiguous read, then the picked steps
        return np.asarray(span)[real - real[0]]


# ----------------------------------------------------------------------------- CompressedAD

def stage_len(n_transit: int) -> int:
    """Steps CompressedAD folds into latents at a time: the oldest half of its recent context."""
    return n_transit // 2


class CompressedADDataset(ADDataset):
    """CompressedAD samples: `compression_depth` d stages, then n_transit recent steps.

    Index space: for each depth d in 0..max_compression_depth, every (task, stream, start)
    whose span d * stage_len + n_transit fits in the stream. Stage lengths are drawn in
    [stage_len // 2, stage_len] from a generator seeded by the index (so a sample is the
    same every time it is read); eval compresses stages of exactly stage_len. Depth d's
    share of the index space is its number of start positions, so every depth up to the
    deepest that fits a stream is trained on; evaluation goes deeper by applying the same
    encoder recursively (its latents are its own input), which training exercises up to d.
    """

    def __init__(self, path, cfg: dict, part: str = "train", task_indices=None, in_memory=False):
        super().__init__(path, cfg, part, task_indices, in_memory, two_region=False)
        self.stage_max = stage_len(cfg["n_transit"])
        self.stage_min = max(1, self.stage_max // 2)
        starts = [self.T - (d * self.stage_max + cfg["n_transit"]) + 1 for d in range(cfg["max_compression_depth"] + 1)]
        if starts[-1] < 1:
            deepest = max(d for d, s in enumerate(starts) if s >= 1) if starts[0] >= 1 else None
            raise ConfigError(f"max_compression_depth={cfg['max_compression_depth']} does not fit streams of "
                              f"{self.T} steps{self.stride_note()} with n_transit={cfg['n_transit']} (stages of up to "
                              f"{self.stage_max} steps); the deepest that fits is {deepest}")
        per_start = len(self.tasks) * len(self.streams)
        self.depth_sizes = [s * per_start for s in starts]
        self.depth_offsets = np.concatenate([[0], np.cumsum(self.depth_sizes)])

    def __len__(self):
        return int(self.depth_offsets[-1])

    def depth_ranges(self) -> dict[int, range]:
        offsets = self.depth_offsets
        return {d: range(int(offsets[d]), int(offsets[d + 1])) for d in range(len(self.depth_sizes))}

    def depth_of(self, index: int) -> int:
        return int(np.searchsorted(self.depth_offsets, index, side="right") - 1)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        d = self.depth_of(index)
        rest = index - int(self.depth_offsets[d])
        n_starts = self.depth_sizes[d] // (len(self.tasks) * len(self.streams))
        task_stream, start = divmod(rest, n_starts)
        task, stream = divmod(task_stream, len(self.streams))
        one = self.stream_view(self.tasks[task], self.streams[stream])
        lengths = np.random.default_rng([index, 17]).integers(self.stage_min, self.stage_max + 1, d)
        stages, a = [], start
        for length in lengths:
            stages.append(window_tokens(self.cfg, one, a, a + int(length)))
            a += int(length)
        return {"compression_depth": d, "stages": stages,
                "recent": window_tokens(self.cfg, one, a, a + self.cfg["n_transit"])}


class StepBatches:
    """Batch of dataset indices for each step: a pure function of (seed, rank, step), so a
    resumed run draws exactly the batches the uninterrupted run would have drawn."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, start: int, stop: int):
        self.n, self.batch_size, self.seed, self.rank, self.start, self.stop = n, batch_size, seed, rank, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield np.random.default_rng([self.seed, self.rank, step]).integers(0, self.n, self.batch_size).tolist()

    def __len__(self):
        return self.stop - self.start


class LazyPermutation:
    """A pseudo-random permutation of range(n) computed element by element, so an epoch of
    hundreds of millions of windows needs no index array: a 4-round Feistel network over
    the smallest even number of bits that holds n, applied again to values past n (cycle
    walking, at most ~4 times on average) so that it maps range(n) onto itself."""

    ROUNDS = 4

    def __init__(self, n: int, key):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.default_rng(key).integers(0, 2 ** 63, self.ROUNDS, dtype=np.uint64)

    def __call__(self, i) -> np.ndarray:
        x = self._encrypt(np.atleast_1d(np.asarray(i, dtype=np.uint64)))
        out = x >= self.n
        while out.any():
            x[out] = self._encrypt(x[out])
            out = x >= self.n
        return x.astype(np.int64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << half) | right


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit (uint64, wrapping)."""
    z = z * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class BucketSampler:
    """Batches of one compression depth each, shuffled within and across depth buckets.

    An epoch cuts each depth bucket, in a shuffled order, into batches (one partial batch
    per bucket unless drop_last), and shuffles the batches of all buckets together.
    Deterministic under `seed`; `set_epoch` reshuffles; under DDP each rank takes every
    world_size-th batch of the epoch, so the shards are disjoint and together cover every
    index once per epoch (ranks may get one batch more or less; training counts steps,
    not epochs, so nothing waits on that). Nothing of size of an epoch is held: batch j is
    computed from lazy permutations of the batch order and of its bucket (memory does not
    grow with the dataset). Works with DataLoader workers: the sampler runs in the main
    process and only hands index lists to the workers.
    """

    def __init__(self, dataset: CompressedADDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        buckets = list(dataset.depth_ranges().values())
        self.starts = np.array([r.start for r in buckets], dtype=np.int64)
        self.sizes = np.array([len(r) for r in buckets], dtype=np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        per_bucket = self.sizes // batch_size if drop_last else -(-self.sizes // batch_size)
        self.first_batch = np.concatenate([[0], np.cumsum(per_bucket)])  # bucket d's batches: first_batch[d]..[d+1]
        self.n_batches = int(self.first_batch[-1])  # in the epoch, all ranks
        self.set_epoch(0)

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        self._order = self._permutation(self.n_batches, -1)

    def _permutation(self, n: int, bucket: int):
        if not self.shuffle:
            return lambda i: np.atleast_1d(np.asarray(i, dtype=np.int64))
        return LazyPermutation(n, [self.seed, self.epoch, bucket + 1])

    def batch(self, j: int) -> list[int]:
        """This rank's j-th batch of the epoch."""
        b = int(self._order(self.rank + j * self.world_size)[0])  # the batch's place among all buckets
        d = int(np.searchsorted(self.first_batch, b, side="right") - 1)
        k = b - int(self.first_batch[d])  # its place in bucket d
        positions = np.arange(k * self.batch_size, min((k + 1) * self.batch_size, int(self.sizes[d])))
        return (self.starts[d] + self._permutation(int(self.sizes[d]), d)(positions)).tolist()

    def __iter__(self):
        for j in range(len(self)):
            yield self.batch(j)

    def __len__(self):
        return max(0, -(-(self.n_batches - self.rank) // self.world_size))


class BucketBatches:
    """Steps start..stop of an endless run over BucketSampler epochs (for resumable training)."""

    def __init__(self, sampler: BucketSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self):
        per_epoch = len(self.sampler)  # the same every epoch
        if per_epoch == 0:
            raise UserError(f"rank {self.sampler.rank} gets no batch: an epoch has fewer batches than "
                            f"world_size={self.sampler.world_size}; use a smaller train_batch_size or "
                            "fewer processes")
        epoch, j = divmod(self.start, per_epoch)
        for _ in range(self.start, self.stop):
            if j == per_epoch:
                epoch, j = epoch + 1, 0
            if j == 0 or self.sampler.epoch != epoch:
                self.sampler.set_epoch(epoch)
            yield self.sampler.batch(j)
            j += 1

    def __len__(self):
        return self.stop - self.start


def _stack(items: list[dict], length: int | None = None) -> dict:
    """Stack token dicts, right-padding each to `length` (0 values; the mask says what is real)."""
    length = length or max(len(t["state"]) for t in items)
    out = {}
    for k in items[0]:
        arr = np.zeros((len(items), length), dtype=items[0][k].dtype)
        for i, t in enumerate(items):
            arr[i, :len(t[k])] = t[k]
        out[k] = torch.from_numpy(arr)
    lengths = np.array([len(t["state"]) for t in items])
    out["mask"] = torch.from_numpy(np.arange(length)[None, :] < lengths[:, None])
    return out


def collate_compressed_batch(batch: list[dict]) -> dict:
    """One depth per batch (BucketSampler's promise, checked); pads only within each stage."""
    depth = batch[0]["compression_depth"]
    assert all(item["compression_depth"] == depth for item in batch), \
        f"mixed compression depths in one batch: {sorted({item['compression_depth'] for item in batch})}"
    stages = [_stack([item["stages"][i] for item in batch]) for i in range(depth)]
    recent = _stack([item["recent"] for item in batch])
    recent.pop("mask")
    return {"num_compression_stages": depth, "compression_stages": stages, "recent": recent}
