"""train.py on a tiny random-policy history: TensorBoard tags, checkpoints, exact resume,
refused resume and config errors (exit 2, one line), and a 2-process DDP (gloo) smoke run."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_in_process import assert_one_line_error, run_in_process
from fixtures_history import build_history_file, cli_sets, config_files, make_cfg
from model_helpers import assert_same_state, interrupted_then_resumed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dataset
import env as envs
import train
from algorithm.history import dataset_path
from cli import run_path
from errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # train_timesteps of the tiny run (fixtures_history.MODEL_SETS)


def scalars(run_dir: Path) -> dict:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def script(name, sets, *configs):
    return [sys.executable, str(ROOT / name), *[str(c) for c in configs], "--set", *sets]


def run_script(args, timeout=240, env=None):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env or dict(os.environ, OMP_NUM_THREADS="1"))



def run_main_in_process(monkeypatch, capsys, argv) -> tuple[int, str]:
    """train.py's command line in this process: (exit code, stderr)."""
    return run_in_process(monkeypatch, capsys, "train.py", train.main, argv)


# ----------------------------------------------------------------------------- a tiny run

@pytest.mark.parametrize("compressed", [False, True], ids=["AD", "two_region"])
def test_tiny_run_writes_config_checkpoint_and_tensorboard_tags(data_dir, tmp_path, compressed):
    cfg = make_cfg(data_dir, tmp_path / "runs", compressed=compressed)
    run_dir = train.train(cfg)
    assert run_dir == run_path(cfg)
    assert run_dir.name == ("AD-tworegion-darkroom-seed0" if compressed else "AD-darkroom-seed0")
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == cfg
    state = torch.load(run_dir / "ckpt-last.pt", weights_only=True)
    assert state["step"] == STEPS and {"model", "optimizer", "torch_rng"} <= set(state)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["seconds"] > 0
    assert 50 < summary["peak_rss_mb"] < 20_000  # torch alone is over 100 MB; KiB read as MB would be far over

    tags = scalars(run_dir)
    want = {"train/loss_action", "train/acc_action", "train/lr", "test/loss_action", "test/acc_action",
            "eval/return_first", "eval/return_final"}
    if compressed:
        want |= {"train/loss_token_type", "train/acc_token_type", "test/loss_token_type"}
    assert want <= set(tags), sorted(set(want) - set(tags))
    if not compressed:
        assert not any("token_type" in t for t in tags)
    assert [s for s, _ in tags["train/loss_action"]] == list(range(2, STEPS + 1, 2))  # log_interval=2
    assert [s for s, _ in tags["test/loss_action"]] == [6, 12]                      # test_interval=6
    assert [s for s, _ in tags["eval/return_final"]] == [6, 12]                      # eval_interval=6
    # the logged lr is the one the logged step used: warmup then cosine decay
    for s, v in tags["train/lr"]:
        assert v == pytest.approx(train.lr_at(s - 1, cfg), rel=1e-6)
    assert tags["train/lr"][0][1] == pytest.approx(cfg["lr"])  # step 2 ends the 2-step warmup
    for _, v in tags["train/loss_action"] + tags["test/loss_action"]:
        assert 0.5 < v < 3.0  # about ln 5 for an untrained model over 5 actions
    for _, v in tags["train/acc_action"]:
        assert 0.0 <= v <= 1.0
    for _, v in tags["eval/return_first"] + tags["eval/return_final"]:
        assert 0.0 <= v <= cfg["horizon"]


def test_the_resolved_config_is_a_tensorboard_text_entry(data_dir, tmp_path):
    run_dir = train.train(make_cfg(data_dir, tmp_path / "runs"))
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "n_transit: 40" in text and "model: AD" in text


def test_single_stream_data_trains_with_test_losses_from_the_validation_tasks(tmp_path):
    """One stream per task (one learner's whole history) leaves no stream to hold out: with
    test_stream_ratio=0 the test/ losses come from the validation tasks, never the test tasks."""
    from fixtures_history import T
    cfg = make_cfg(tmp_path / "data", tmp_path / "runs",
                   extra=["n_stream=1", f"total_source_timesteps={T}", "test_stream_ratio=0"])
    build_history_file(cfg)
    held_out = dataset.ADDataset(dataset_path(cfg), cfg, part="val")
    assert held_out.tasks == envs.tasks_of_split(cfg, "val") and held_out.streams == [0]
    run_dir = train.train(cfg)
    assert [s for s, _ in scalars(run_dir)["test/loss_action"]] == [6, 12]
    with pytest.raises(ConfigError, match="no test streams.*test_stream_ratio"):
        dataset.ADDataset(dataset_path(cfg), {**cfg, "test_stream_ratio": 0.5}, part="test")


def test_validation_losses_without_validation_tasks_are_refused(tmp_path):
    cfg = make_cfg(tmp_path / "data", extra=["val_env_ratio=0", "test_stream_ratio=0"])
    build_history_file(cfg)
    with pytest.raises(ConfigError, match="no val task; raise val_env_ratio"):
        dataset.ADDataset(dataset_path(cfg), cfg, part="val")


def test_learning_rate_schedule():
    cfg = {"lr": 1e-3, "warmup_steps": 10, "train_timesteps": 110}
    assert train.lr_at(0, cfg) == pytest.approx(1e-4)
    assert train.lr_at(9, cfg) == pytest.approx(1e-3)
    assert train.lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.45))
    assert train.lr_at(110, cfg) == pytest.approx(1e-4)


def test_step_batches_are_a_pure_function_of_seed_rank_and_step():
    whole = list(dataset.StepBatches(1000, 4, seed=3, rank=0, start=0, stop=10))
    assert list(dataset.StepBatches(1000, 4, seed=3, rank=0, start=6, stop=10)) == whole[6:]
    assert list(dataset.StepBatches(1000, 4, seed=3, rank=1, start=0, stop=10)) != whole
    assert all(len(b) == 4 and all(0 <= i < 1000 for i in b) for b in whole)


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("compressed", [False, True], ids=["AD", "two_region"])
def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(data_dir, tmp_path, monkeypatch, compressed):
    cfg_a = make_cfg(data_dir, tmp_path / "A", compressed=compressed)
    cfg_b = make_cfg(data_dir, tmp_path / "B", compressed=compressed)
    train.train(cfg_a)
    a = torch.load(run_path(cfg_a) / "ckpt-last.pt", weights_only=True)
    _, b = interrupted_then_resumed(monkeypatch, cfg_b, kill_at_step=STEPS // 2)  # last checkpoint: step 4
    assert_same_state(a, b, STEPS)
    # the check is not vacuous: the run moved the parameters away from their initialisation
    torch.manual_seed(cfg_a["seed"])
    init = train.build(cfg_a, envs.model_inputs(cfg_a)).state_dict()
    assert any(not torch.equal(init[k], a["model"][k]) for k in init)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: checks that the GPU's generator is saved and restored"))])
def test_resume_is_exact_with_dropout(data_dir, tmp_path, monkeypatch, device):
    extra = ["tf_dropout=0.2", f"device={device}"]
    cfg_a = make_cfg(data_dir, tmp_path / "A", extra=extra)
    cfg_b = make_cfg(data_dir, tmp_path / "B", extra=extra)
    train.train(cfg_a)
    a = torch.load(run_path(cfg_a) / "ckpt-last.pt", weights_only=True)
    _, b = interrupted_then_resumed(monkeypatch, cfg_b, kill_at_step=STEPS // 2)
    assert_same_state(a, b, STEPS)


def test_finished_run_is_not_retrained_and_free_keys_may_change(data_dir, tmp_path, capsys):
    cfg = make_cfg(data_dir, tmp_path / "runs")
    train.train(cfg)
    ckpt = run_path(cfg) / "ckpt-last.pt"
    before = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    # where/how-often keys (RESUME_FREE_KEYS) may differ on a rerun
    train.train(make_cfg(data_dir, tmp_path / "runs", extra=["log_interval=3", "eval_interval=0"]))
    assert "already finished" in capsys.readouterr().out
    assert ckpt.stat().st_mtime_ns == before


def test_runs_saved_before_a_key_existed_resume_with_the_value_they_used(data_dir, tmp_path):
    """region_end_weight came later (runs before it trained with 1): a two-region run saved
    without it is another setting than the new default; plain AD does not read it. A run
    saved before episode_stride trained on consecutive episodes (1, the default)."""
    from errors import UserError
    cfg = make_cfg(data_dir, tmp_path / "runs")
    old = {k: v for k, v in cfg.items() if k not in ("region_end_weight", "data_cache_mb", "max_tasks", "episode_stride")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    train.check_resumable(tmp_path, cfg)
    two_region = {**cfg, "use_compressed_context": True}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**old, "use_compressed_context": True}))
    with pytest.raises(UserError, match="region_end_weight=1.0"):
        train.check_resumable(tmp_path, two_region)
    train.check_resumable(tmp_path, {**two_region, "region_end_weight": 1.0})
    with pytest.raises(UserError, match="episode_stride=1"):  # a run on consecutive episodes is not a stride-2 run
        train.check_resumable(tmp_path, {**two_region, "region_end_weight": 1.0, "use_compressed_context": False,
                                         "episode_stride": 2})


def test_resume_with_another_config_is_refused(data_dir, tmp_path):
    runs = tmp_path / "runs"
    cfg = make_cfg(data_dir, runs, extra=["train_timesteps=4", "eval_interval=0"])
    train.train(cfg)
    ckpt = run_path(cfg) / "ckpt-last.pt"
    before = ckpt.read_bytes()
    proc = run_script(script("train.py", cli_sets(data_dir, runs, extra=["train_timesteps=4", "eval_interval=0",
                                                                          "lr=0.002"]), *config_files()))
    assert_one_line_error(proc.returncode, proc.stderr, "lr=0.001", "0.002", str(run_path(cfg)))
    assert ckpt.read_bytes() == before


def test_damaged_checkpoint_on_resume_exits_2(data_dir, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    sets = cli_sets(data_dir, runs, extra=["train_timesteps=4", "eval_interval=0"])
    code, err = run_main_in_process(monkeypatch, capsys, [*config_files(), "--set", *sets])
    assert code == 0, err
    ckpt = runs / "AD-darkroom-seed0" / "ckpt-last.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    code, err = run_main_in_process(monkeypatch, capsys, [*config_files(), "--set", *sets])
    assert_one_line_error(code, err, "ckpt-last.pt")


# ----------------------------------------------------------------------------- config errors

def test_two_region_context_shorter_than_two_regions_exits_2(data_dir, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    code, err = run_main_in_process(monkeypatch, capsys, [*config_files(True), "--set",
                                                          *cli_sets(data_dir, runs, True, extra=["n_transit=39"])])
    assert_one_line_error(code, err, "n_transit=39", "40")
    assert not runs.exists()  # stopped before any work


def test_tiny_run_on_subsampled_histories(data_dir, tmp_path):
    """episode_stride reaches the dataset through train.py: training and held-out windows of
    every second episode, the stride saved with the run."""
    cfg = make_cfg(data_dir, tmp_path / "runs", extra=["episode_stride=2"])
    run_dir = train.train(cfg)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["episode_stride"] == 2
    assert torch.load(run_dir / "ckpt-last.pt", weights_only=True)["step"] == STEPS
    assert [s for s, _ in scalars(run_dir)["test/loss_action"]] == [6, 12]


@pytest.mark.parametrize("stride, words", [(3, "whole number of rollouts"), (20, "10 rollouts apart")])
def test_two_region_stride_that_is_not_whole_rollouts_or_too_long_exits_2(data_dir, tmp_path, monkeypatch, capsys,
                                                                         stride, words):
    """Two-region regions k episodes apart: 3 episodes of 10 steps are not whole rollouts of 20 steps,
    and 20 episodes put the regions 10 rollouts apart in a stream of 10."""
    runs = tmp_path / "runs"
    code, err = run_main_in_process(monkeypatch, capsys, [*config_files(True), "--set",
                                                          *cli_sets(data_dir, runs, True,
                                                                    extra=[f"episode_stride={stride}"])])
    assert_one_line_error(code, err, f"episode_stride={stride}", words)
    assert not runs.exists()


def test_unknown_key_exits_2(data_dir, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    code, err = run_main_in_process(monkeypatch, capsys, [*config_files(), "--set",
                                                          *cli_sets(data_dir, runs, extra=["n_trnsit=40"])])
    assert_one_line_error(code, err, "n_trnsit", "n_transit")
    assert not runs.exists()


def test_compress_interval_other_than_the_files_n_steps_exits_2(data_dir, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    code, err = run_main_in_process(monkeypatch, capsys, [*config_files(True), "--set", *cli_sets(
        data_dir, runs, True, extra=["n_steps=10", "compress_interval=10", "n_transit=20"])])
    assert code == 2 and "n_steps=20 (asked 10)" in err, err
    assert not (runs / "AD-tworegion-darkroom-seed0" / "ckpt-last.pt").exists()


def test_missing_dataset_exits_2(tmp_path, monkeypatch, capsys):
    code, err = run_main_in_process(monkeypatch, capsys, [*config_files(), "--set",
                                                          *cli_sets(tmp_path / "nodata", tmp_path / "runs")])
    assert_one_line_error(code, err, "dataset not found", "collect.py")


# ----------------------------------------------------------------------------- DDP

MODEL_COMPRESSED_AD = ROOT / "config/model/ad_compressed_dr.yaml"
# a tiny CompressedAD: stages of 10..20 steps, depths 0..2 (tests/compressed_helpers.py's sizes)
COMPRESSED_AD_SETS = ["n_transit=40", "n_latent=4", "enc_n_layer=1", "max_compression_depth=2",
                      "grad_compression_rounds=1"]
DDP_VARIANTS = {  # name: (run directory, model config, extra --set, two-region)
    "AD": ("AD-darkroom-seed0", None, [], False),
    "two_region": ("AD-tworegion-darkroom-seed0", None, [], True),
    "CompressedAD": ("CompressedAD-darkroom-seed0", MODEL_COMPRESSED_AD, COMPRESSED_AD_SETS, False),
}
DDP_SETS = ["train_timesteps=4", "ckpt_interval=2", "eval_interval=2", "test_interval=2"]

# train.py under torchrun, every rank dying like kill -9 when it is about to run step DIE_AT
DYING_TRAIN = r"""
import os, sys
sys.path.insert(0, os.environ["TOOLKIT_ROOT"])
import train
real, die_at = train.lr_at, int(os.environ["DIE_AT"])
def dying_lr_at(step, cfg):
    if step == die_at:
        os._exit(9)
    return real(step, cfg)
train.lr_at = dying_lr_at
train.main()
"""


def ddp_configs(variant: str) -> list[str]:
    _, model, _, two_region = DDP_VARIANTS[variant]
    files = config_files(two_region)
    return [str(c) for c in (files[:2] + [model] if model else files)]


def torchrun_train(variant: str, data_dir, runs, script=None, extra=(), env=None):
    torchrun = Path(sys.executable).with_name("torchrun")
    _, _, sets, two_region = DDP_VARIANTS[variant]
    args = cli_sets(data_dir, runs, two_region, extra=DDP_SETS + sets + list(extra))
    return run_script([str(torchrun), "--standalone", "--nproc_per_node=2", str(script or ROOT / "train.py"),
                       *ddp_configs(variant), "--set", *args], timeout=300, env=env)


def compressed_ad_depths(data_dir, rank: int) -> list[int]:
    """The compression depth of each of a tiny DDP CompressedAD run's batches on `rank`."""
    from dataset import BucketBatches, BucketSampler, CompressedADDataset
    cfg = train.load_config(ddp_configs("CompressedAD"), train.parse_set(
        cli_sets(data_dir, extra=DDP_SETS + COMPRESSED_AD_SETS)))
    data = CompressedADDataset(train.dataset_path(cfg), cfg)
    batches = BucketBatches(BucketSampler(data, cfg["train_batch_size"], seed=cfg["seed"], rank=rank, world_size=2),
                            0, cfg["train_timesteps"])
    return [data.depth_of(b[0]) for b in batches]


@pytest.mark.parametrize("variant", list(DDP_VARIANTS))
def test_ddp_two_processes_gloo_on_cpu(data_dir, tmp_path, variant):
    runs = tmp_path / "runs"
    proc = torchrun_train(variant, data_dir, runs)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    run_dir = runs / DDP_VARIANTS[variant][0]
    state = torch.load(run_dir / "ckpt-last.pt", weights_only=True)
    assert state["step"] == 4
    assert "world size 2" in proc.stdout + proc.stderr
    tags = scalars(run_dir)
    assert [s for s, _ in tags["train/loss_action"]] == [2, 4]
    assert all(math.isfinite(v) for _, v in tags["train/loss_action"])
    assert np.isfinite(np.concatenate([v.flatten().numpy() for v in state["model"].values()])).all()
    if variant == "CompressedAD":  # not vacuous: a rank trains a batch that skips the encoder, then another step
        depths = [compressed_ad_depths(data_dir, r) for r in (0, 1)]
        assert any(0 in d[:-1] for d in depths) and any(x > 0 for d in depths for x in d), depths


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_ddp_backend_follows_the_training_device(monkeypatch, device, backend):
    """A device=cpu run on a GPU box must use gloo: nccl cannot reduce CPU tensors."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(train.dist, "init_process_group", chosen.append)
    monkeypatch.setattr(train.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train.setup_distributed(torch.device(device)) == (0, 2)
    assert chosen == [backend]


@pytest.mark.slow  # three torchrun runs: ~40 s on 2 cores
@pytest.mark.parametrize("variant", list(DDP_VARIANTS))
def test_ddp_resume_after_kill_gives_the_same_parameters(data_dir, tmp_path, variant):
    a, b = tmp_path / "A", tmp_path / "B"
    assert torchrun_train(variant, data_dir, a).returncode == 0
    dying = tmp_path / "dying_train.py"
    dying.write_text(DYING_TRAIN)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOOLKIT_ROOT=str(ROOT), DIE_AT="3")
    killed = torchrun_train(variant, data_dir, b, script=dying, env=env)
    assert killed.returncode != 0
    run_dir = DDP_VARIANTS[variant][0]
    assert torch.load(b / run_dir / "ckpt-last.pt", weights_only=True)["step"] == 2  # the rerun redoes step 3
    resumed = torchrun_train(variant, data_dir, b)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    sa, sb = (torch.load(r / run_dir / "ckpt-last.pt", weights_only=True) for r in (a, b))
    assert sa["step"] == sb["step"] == 4
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
