"""ADDataset (dataset.py) against the raw arrays of a tiny random-policy history file:
standard windows, two-region samples, token-type targets, train/test streams, refusals,
the fallback for files without markers, and DataLoader workers reading from the file."""
import shutil
import warnings

import h5py
import numpy as np
import pytest
import torch
from fixtures_history import HORIZON, N_STEPS, N_STREAM, T, build_history_file, make_cfg, read_stream
from torch.utils.data import DataLoader

import env as envs
from algorithm import history
from dataset import ADDataset
from errors import ConfigError, UserError
from tokens import IGNORE, KIND_END, KIND_START, KIND_STEP


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dataset_data")
    cfg = make_cfg(d, d / "runs")
    return d, cfg, make_cfg(d, d / "runs", compressed=True), build_history_file(cfg)


def expected_window(cfg, raw, a, n):
    """The documented token fields of steps a..a+n-1 of one stream, computed from scratch."""
    n_actions = envs.n_actions(cfg)
    rows = []
    for t in range(a, a + n):
        first = t == 0
        rows.append({"state": envs.state_token(cfg, raw["states"][t]),
                     "prev_action": n_actions if first else raw["actions"][t - 1],
                     "prev_reward": 0.0 if first else raw["rewards"][t - 1],
                     "new_episode": 1 if first else int(raw["dones"][t - 1]),
                     "action": raw["actions"][t]})
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def test_fixture_file_is_a_valid_history(data):
    _, cfg, _, path = data
    header = history.read_header(path)
    assert header["done"] == list(range(25)) and header["split"] == envs.task_split(cfg)
    raw = read_stream(path, 0, 2)
    assert raw["actions"].shape == (T,)
    np.testing.assert_array_equal(raw["compress_markers"], history.compress_markers(T, N_STEPS, 1)[:, 0])
    ends = np.flatnonzero(raw["dones"])
    assert (ends % HORIZON == HORIZON - 1).all() and len(ends) == T // HORIZON
    cont = ~raw["dones"][:-1]
    np.testing.assert_array_equal(raw["states"][1:][cont], raw["next_states"][:-1][cont])
    assert (raw["states"][1:][~cont] == 2).all()  # the reset state (centre of the 5x5 grid)


@pytest.mark.parametrize("index", [0, 1, 160, 161, 500, -1])
def test_standard_window_matches_the_raw_stream(data, index):
    _, cfg, _, path = data
    ds = ADDataset(path, cfg)
    n = cfg["n_transit"]
    assert ds.per_stream == T - n + 1
    assert len(ds) == len(ds.tasks) * 3 * (T - n + 1)  # 3 train streams of 4
    index = index % len(ds)
    task, stream, a = ds.locate(index)
    sample = ds[index]
    raw = read_stream(path, task, stream)
    want = expected_window(cfg, raw, a, n)
    assert set(sample) == {"kind", "state", "prev_action", "prev_reward", "new_episode", "action", "next_kind"}
    for k, v in want.items():
        np.testing.assert_array_equal(sample[k], v, err_msg=k)
        assert sample[k].shape == (n,)
    assert (sample["kind"] == KIND_STEP).all() and (sample["next_kind"] == KIND_STEP).all()


def test_first_step_of_a_stream_and_new_episode_after_dones(data):
    _, cfg, _, path = data
    ds = ADDataset(path, cfg)
    n = cfg["n_transit"]
    first = ds[0]
    task, stream, a = ds.locate(0)
    assert a == 0
    assert first["prev_action"][0] == envs.n_actions(cfg)  # "no previous action"
    assert first["new_episode"][0] == 1 and first["prev_reward"][0] == 0.0
    raw = read_stream(path, task, stream)
    # new_episode is 1 exactly on the step after a done (episodes of HORIZON steps)
    for a in (0, 3, 9, 10, 57):
        s = ds[a]  # same task and stream, window start a
        assert ds.locate(a) == (task, stream, a)
        want = np.array([t == 0 or bool(raw["dones"][t - 1]) for t in range(a, a + n)])
        np.testing.assert_array_equal(s["new_episode"].astype(bool), want)
        np.testing.assert_array_equal(s["new_episode"].astype(bool), np.arange(a, a + n) % HORIZON == 0)
        # the prev_action of step t is the action target of step t-1
        np.testing.assert_array_equal(s["prev_action"][1:], s["action"][:-1])


def test_two_region_sample_layout(data):
    _, _, ccfg, path = data
    ds = ADDataset(path, ccfg)
    assert ds.two_region and ds.per_stream == T // N_STEPS - 1
    assert len(ds) == len(ds.tasks) * 3 * (T // N_STEPS - 1)
    I = N_STEPS
    kinds = np.array([KIND_START] + [KIND_STEP] * I + [KIND_END] + [KIND_START] + [KIND_STEP] * I + [KIND_END])
    for index in (0, 1, 8, 9, 100, len(ds) - 1):
        s = ds[index]
        task, stream, pos = ds.locate(index)
        k = pos + 1
        np.testing.assert_array_equal(s["kind"], kinds)
        raw = read_stream(path, task, stream)
        steps = s["kind"] == KIND_STEP
        prev_region, cur_region = expected_window(ccfg, raw, (k - 1) * I, I), expected_window(ccfg, raw, k * I, I)
        for f in ("state", "prev_action", "prev_reward", "new_episode", "action"):
            np.testing.assert_array_equal(s[f][1:1 + I], prev_region[f], err_msg=f)
            np.testing.assert_array_equal(s[f][I + 3:2 * I + 3], cur_region[f], err_msg=f)
        # regions are the file's rollout regions: start/end markers in compress_markers
        assert raw["compress_markers"][(k - 1) * I] == history.MARK_START
        assert raw["compress_markers"][(k + 1) * I - 1] == history.MARK_END
        # action targets only on steps
        assert (s["action"][~steps] == IGNORE).all() and (s["action"][steps] >= 0).all()
        # token-type targets: the kind of the next token
        next_kind = np.full(len(kinds), KIND_STEP)
        next_kind[[I, 2 * I + 2]] = KIND_END           # last step of each region -> </compress>
        next_kind[[0, I + 2]] = KIND_STEP              # <compress> -> a step
        next_kind[I + 1] = KIND_START                  # </compress> -> <compress>
        np.testing.assert_array_equal(s["next_kind"][:-1], next_kind[:-1])
        assert s["next_kind"][-1] in (KIND_START, IGNORE)  # after the last </compress> comes a <compress>
        np.testing.assert_array_equal(s["next_kind"][:-1], s["kind"][1:])


def test_test_split_streams_are_disjoint_from_train_streams(data):
    _, cfg, ccfg, path = data
    for c in (cfg, ccfg):
        train, test = ADDataset(path, c, part="train"), ADDataset(path, c, part="test")
        assert test.tasks == train.tasks  # held-out streams of the same training tasks
        train_streams = {train.locate(i)[1] for i in range(len(train))}
        test_streams = {test.locate(i)[1] for i in range(len(test))}
        assert train_streams == {1, 2, 3} and test_streams == {0}
        # and the content is that stream's: the action targets of a test sample come from stream 0
        task, stream, pos = test.locate(5)
        raw = read_stream(path, task, 0)
        s = test[5]
        steps = s["kind"] == KIND_STEP
        a = pos * N_STEPS if c["use_compressed_context"] else pos
        np.testing.assert_array_equal(s["action"][steps], raw["actions"][a:a + steps.sum()])


def test_training_tasks_only(data):
    _, cfg, _, path = data
    split = envs.task_split(cfg)
    test_task = split.index("test")
    train_task = split.index("train")
    ds = ADDataset(path, cfg, task_indices=[train_task])
    assert {ds.locate(i)[0] for i in range(len(ds))} == {train_task}
    assert test_task not in ADDataset(path, cfg).tasks
    with pytest.raises(UserError, match="held-out"):
        ADDataset(path, cfg, task_indices=[train_task, test_task])


def test_compress_interval_must_be_the_files_n_steps(data):
    d, _, _, path = data
    # a consistent config (compress_interval = n_steps = 10) for a file collected with n_steps = 20
    other = make_cfg(d, d / "runs", compressed=True, extra=["n_steps=10", "compress_interval=10"])
    with pytest.raises(ConfigError, match="n_steps=20"):
        ADDataset(path, other)


def test_file_without_markers_falls_back_with_a_warning(data, tmp_path):
    _, cfg, ccfg, path = data
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    with h5py.File(copy, "a") as f:
        for g in f:
            del f[g]["compress_markers"]
    with pytest.warns(UserWarning, match=copy.name):
        ds = ADDataset(copy, ccfg)
    assert not ds.two_region
    s = ds[3]
    assert len(s["kind"]) == ccfg["n_transit"] and (s["kind"] == KIND_STEP).all()
    task, stream, a = ds.locate(3)
    np.testing.assert_array_equal(s["action"], read_stream(path, task, stream)["actions"][a:a + ccfg["n_transit"]])
    # standard mode does not care about markers: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ADDataset(copy, cfg)


@pytest.mark.parametrize("compressed", [False, True])
def test_workers_reading_from_the_file_give_the_same_batches(data, compressed):
    _, cfg, ccfg, path = data
    c = ccfg if compressed else cfg
    lazy = ADDataset(path, c, in_memory=False)
    assert not lazy.in_memory
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(lazy), 4).tolist() for _ in range(6)]
    ref = list(DataLoader(ADDataset(path, c, in_memory=True), batch_sampler=batches, num_workers=0))
    single = list(DataLoader(lazy, batch_sampler=batches, num_workers=0))
    multi = list(DataLoader(ADDataset(path, c, in_memory=False), batch_sampler=batches, num_workers=2))
    assert len(ref) == len(single) == len(multi) == 6
    for r, s, m in zip(ref, single, multi):
        assert r.keys() == s.keys() == m.keys()
        for k in r:
            assert torch.equal(r[k], s[k]) and torch.equal(r[k], m[k]), k
    assert ref[0]["kind"].shape == (4, 2 * N_STEPS + 4 if compressed else c["n_transit"])
    assert N_STREAM == 4


def test_dataset_collected_with_other_data_keys_is_refused(tmp_path):
    """Keys that describe the data (n_stream, total_source_timesteps, PPO settings, the split)
    must match the file, not just the environment."""
    path = build_history_file(make_cfg(tmp_path))
    for extra in (["n_epochs=3"], ["source_lr=0.001"], ["val_env_ratio=0.3"]):
        with pytest.raises(ConfigError, match=extra[0].split("=")[0]):
            ADDataset(path, make_cfg(tmp_path, extra=extra))


@pytest.mark.parametrize("part", ["train", "test"])
@pytest.mark.parametrize("budget", ["three tasks", "none"])
def test_windows_are_read_on_demand_within_a_memory_budget(data, part, budget, monkeypatch):
    """Memory does not grow with the file: reading windows of every task keeps at most
    three tasks (by the data_cache_mb budget, or KEEP open datasets with a budget of 0),
    far less than loading every task."""
    import tracemalloc

    from dataset import _Tasks
    _, cfg, _, path = data
    in_memory = ADDataset(path, cfg, part=part, in_memory=True)
    tracemalloc.start()
    in_memory._load()
    all_tasks = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    task_bytes = sum(a.nbytes for a in in_memory._load()[in_memory.tasks[0]].values())
    monkeypatch.setattr(_Tasks, "KEEP", 3)
    ds = ADDataset(path, cfg, part=part)  # the default, as train.py builds both parts
    ds.cfg = {**cfg, "data_cache_mb": 0}
    if budget == "three tasks":
        monkeypatch.setattr(ds, "_load", lambda: ds._data)
        ds._data = _Tasks(path, int(3.5 * task_bytes))
    per_task = len(ds) // len(ds.tasks)
    tracemalloc.start()
    for t in range(len(ds.tasks)):  # a window of every task, in order
        window = ds[t * per_task + 3]
        assert len(window["action"]) == cfg["n_transit"]
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(ds.tasks) > 10 and held < all_tasks / 4, (held, all_tasks)
    tasks = ds._load()
    assert isinstance(tasks, _Tasks) and list(tasks.open) == ds.tasks[-3:]  # the least recently used went first
    np.testing.assert_array_equal(tasks[ds.tasks[-1]]["actions"][:, 0], read_stream(path, ds.tasks[-1], 0)["actions"])

def test_many_tasks_read_from_the_file_get_a_hint_with_the_memory_they_need(data, monkeypatch):
    from dataset import _Tasks
    _, cfg, _, path = data
    monkeypatch.setattr(_Tasks, "KEEP", 3)
    ds = ADDataset(path, cfg)
    loaded = ADDataset(path, cfg, in_memory=True)
    need = sum(a.nbytes for t in loaded._load().values() for a in t.values()) / 2**20
    assert ds.data_mb() == pytest.approx(need)
    assert f"data_cache_mb={int(need) + 1}" in ds.reading_hint()
    assert ADDataset(path, {**cfg, "data_cache_mb": 64}).reading_hint() is None
    monkeypatch.setattr(_Tasks, "KEEP", 10**6)
    assert ADDataset(path, cfg).reading_hint() is None


def subsampled(raw: dict, offset: int, stride: int) -> dict:
    """Episodes offset, offset + stride, ... of a raw stream, one after another (HORIZON steps each)."""
    episodes = np.arange(offset, T // HORIZON, stride)[:(T // HORIZON) // stride]
    steps = (episodes[:, None] * HORIZON + np.arange(HORIZON)).ravel()
    return {k: v[steps] for k, v in raw.items()}


@pytest.mark.parametrize("index", [0, 1, 20, 21, 200, -1])
def test_episode_stride_windows_show_every_kth_episode(data, index):
    """With episode_stride=3 each train stream is 3 streams (offsets 0, 1, 2) of 6 of its 20
    episodes; a window is n_transit steps of one of them, tokens built as for a real stream."""
    d, _, _, path = data
    cfg = make_cfg(d, d / "runs", extra=["episode_stride=3"])
    ds = ADDataset(path, cfg)
    n, virtual_T = cfg["n_transit"], (T // HORIZON // 3) * HORIZON
    assert ds.T == virtual_T == 60 and ds.per_stream == virtual_T - n + 1
    assert len(ds) == len(ds.tasks) * 3 * 3 * ds.per_stream
    index = index % len(ds)
    task, (stream, offset), a = ds.locate(index)
    want = expected_window(cfg, subsampled(read_stream(path, task, stream), offset, 3), a, n)
    sample = ds[index]
    for k, v in want.items():
        np.testing.assert_array_equal(sample[k], v, err_msg=k)
    # the episodes shown are every third one: a new episode every HORIZON steps of the window
    np.testing.assert_array_equal(sample["new_episode"].astype(bool)[1:], (np.arange(a + 1, a + n) % HORIZON) == 0)


def test_episode_stride_covers_every_offset_and_only_train_streams(data):
    d, _, _, path = data
    cfg = make_cfg(d, d / "runs", extra=["episode_stride=4"])
    train, test = ADDataset(path, cfg), ADDataset(path, cfg, part="test")
    assert train.streams == [(s, o) for s in (1, 2, 3) for o in range(4)]
    assert test.streams == [(0, o) for o in range(4)]
    task, (stream, offset), a = test.locate(len(test) - 1)
    want = expected_window(cfg, subsampled(read_stream(path, task, 0), 3, 4), a, cfg["n_transit"])
    np.testing.assert_array_equal(test[len(test) - 1]["action"], want["action"])


@pytest.mark.parametrize("stride, gap", [(2, 1), (4, 2), (8, 4)])
def test_two_region_with_episode_stride_pairs_rollouts_that_start_stride_episodes_apart(data, stride, gap):
    """Rollouts are 2 episodes: with episode_stride k a sample is region j and region j + k/2 of
    the real stream (stride 2 is consecutive rollouts), every step's tokens as in the file."""
    d, _, _, path = data
    ccfg = make_cfg(d, d / "runs", compressed=True, extra=[f"episode_stride={stride}"])
    ds = ADDataset(path, ccfg)
    assert ds.two_region and ds.region_gap == gap and ds.per_stream == T // N_STEPS - gap
    assert ds.streams == [1, 2, 3]  # real streams: no episode offsets in two-region mode
    I = N_STEPS
    for index in (0, 7, len(ds) - 1):
        task, stream, j = ds.locate(index)
        raw, s = read_stream(path, task, stream), ds[index]
        earlier, later = expected_window(ccfg, raw, j * I, I), expected_window(ccfg, raw, (j + gap) * I, I)
        for f in ("state", "prev_action", "prev_reward", "new_episode", "action"):
            np.testing.assert_array_equal(s[f][1:1 + I], earlier[f], err_msg=f)
            np.testing.assert_array_equal(s[f][I + 3:2 * I + 3], later[f], err_msg=f)


def test_episode_stride_refusals(data, tmp_path):
    d, _, _, path = data
    with pytest.raises(ConfigError, match=r"episode_stride=3 .* 3 episodes \(30 steps\) to be a whole number of "
                                          r"rollouts of compress_interval=20 steps; pick a stride that is a multiple of 2"):
        make_cfg(d, d / "runs", compressed=True, extra=["episode_stride=3"])
    with pytest.raises(ConfigError, match="episode_stride=21 is more than the 20 episodes"):
        ADDataset(path, make_cfg(d, d / "runs", extra=["episode_stride=21"]))
    with pytest.raises(ConfigError, match=r"n_transit=41 is longer than a stream \(40 steps after episode_stride=5\)"):
        ADDataset(path, make_cfg(d, d / "runs", extra=["episode_stride=5", "n_transit=41"]))
    uneven = tmp_path / path.name
    shutil.copyfile(path, uneven)
    with h5py.File(uneven, "a") as f:
        first_train = str(ADDataset(path, make_cfg(d, d / "runs")).tasks[0])
        f[first_train]["dones"][4, 1] = True  # an episode of 5 steps in the first train stream
    with pytest.raises(ConfigError, match="equal-length episodes.*episode_stride=1"):
        ADDataset(uneven, make_cfg(tmp_path, tmp_path / "runs", extra=["episode_stride=2"]))
