"""SummaryAD (model/summary.py): samples of whole segments with a burn-in, gradients through
every summary write, SummaryMemory rollouts (cached = uncached = the training forward over
the same steps, memory ablation, bounded context) and train.py / evaluate.py end to end.

Data: the tiny random-policy darkroom history of tests/fixtures_history.py (T=200 steps per
stream, horizon 10). Model: segments of S=10 steps, K=2 summaries each, M=2 segments kept,
samples of N=4 segments: at most M*K + S + K = 16 tokens.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_in_process import assert_one_line_error, run_in_process
from fixtures_history import ALG, ENV, T, build_history_file, cli_sets
from model_helpers import sensitive_model

import env as envs
import evaluate
import train
from cli import load_config
from config.loading import parse_set
from model import rollout as rollout_mod
from model.ad import _cross_entropy
from model.rollout import rollout, sample_actions
from model.summary import SummaryADDataset, SummaryMemory, summary_budget
from tokens import IGNORE

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "config/model/summary_ad_k2d.yaml"
S, K, M, N = 10, 2, 2, 4
SETS = [f"segment_len={S}", f"n_summary={K}", f"summary_segments={M}", f"train_segments={N}", "train_timesteps=6",
        "eval_interval=3", "test_interval=3", "ckpt_interval=3", "log_interval=1", "eval_episodes=4"]


def summary_cfg(data_dir, run_dir=None, extra=()) -> dict:
    return load_config([ALG, ENV, MODEL], parse_set(cli_sets(data_dir, run_dir, extra=SETS + list(extra))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("summary_data")
    cfg = summary_cfg(d, d / "runs")
    return d, cfg, build_history_file(cfg)


@pytest.fixture(scope="module")
def samples(data):
    _, cfg, path = data
    return SummaryADDataset(path, cfg, task_indices=envs.tasks_of_split(cfg, "train")[:2], in_memory=True)


def batch_of(ds, indices):
    from model import variant_of
    return variant_of(ds.cfg).collate([ds[i] for i in indices])


def test_samples_are_whole_segments_with_a_burn_in(samples):
    starts = T // S - N + 1  # 17 start segments per stream
    assert samples.per_stream == starts and len(samples) == 2 * 3 * starts  # 2 tasks x 3 training streams
    for j in (0, 1, 2, 5):
        item = samples[j]  # task 0, first training stream, start segment j
        assert len(item["state"]) == N * S
        ignored = np.flatnonzero(item["action"] == IGNORE)
        np.testing.assert_array_equal(ignored, np.arange(min(j, M) * S))  # the burn-in only


def test_forward_shapes_and_loss(data, samples):
    _, cfg, _ = data
    torch.manual_seed(0)
    from model import build
    model = build(cfg, envs.model_inputs(cfg))
    tokens, targets = batch_of(samples, [0, 5, 20, 40])
    logits, loss = model(tokens, targets)
    assert logits["action"].shape == (4, N * S, envs.n_actions(cfg))
    assert torch.isfinite(loss) and 1.0 < loss.item() < 2.0  # about ln 5 untrained
    metrics = model.metrics(tokens, logits, targets)
    assert set(metrics) == {"loss_action", "acc_action"} and 0.0 <= metrics["acc_action"] <= 1.0
    assert model.max_tokens == M * K + S + K


def test_a_few_steps_lower_the_loss(data, samples):
    _, cfg, _ = data
    torch.manual_seed(0)
    from model import build
    model = build(cfg, envs.model_inputs(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens, targets = batch_of(samples, range(0, 96, 6))
    losses = []
    for _ in range(40):
        _, loss = model(tokens, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, (losses[0], losses[-1])


def written_summaries(model, monkeypatch, tokens, targets, last_segment_only=True):
    """Run the training forward keeping each write's summaries (with their gradient); the
    loss is the last segment's only, so a gradient at an earlier write came through later writes."""
    written = []
    real = type(model).segment

    def segment(self, memory, steps, write, cache=None, batch=0):
        logits, new = real(self, memory, steps, write, cache, batch)
        if new is not None:
            new.retain_grad()
            written.append(new)
        return logits, new

    monkeypatch.setattr(type(model), "segment", segment)
    logits, _ = model(tokens)
    last = targets["action"].clone()
    last[:, :-S] = IGNORE
    _cross_entropy(logits["action"], last).backward()
    return written


@pytest.mark.parametrize("grad_segments", [0, 2])
def test_the_last_segments_loss_reaches_the_oldest_summary_write(data, samples, monkeypatch, grad_segments):
    _, cfg, _ = data
    model = sensitive_model(cfg)
    model.grad_segments = grad_segments
    tokens, targets = batch_of(samples, [0, 1])
    written = written_summaries(model, monkeypatch, tokens, targets)
    assert len(written) == N - 1  # the last segment writes nothing (no reader)
    # segment 3 reads the writes of segments 1 and 2 (M = 2); segment 0's reaches it through segment 1's write
    reached = [w.grad is not None and bool(w.grad.abs().sum() > 0) for w in written]
    assert model.queries.grad.abs().sum() > 0
    # the memory is detached before segment 2 with grad_segments=2: only segment 2's own write is reached
    assert reached == ([True, True, True] if grad_segments == 0 else [False, False, True])


def recorded_rollout(monkeypatch, model, cfg, use_cache, n_episodes, memory="keep", tokens=None):
    """One rollout per test task through SummaryMemory: (logits of each step, the tokens fed,
    stats, the memory). With `tokens`, those steps are fed instead of the environment's."""
    logits_log, fed, memories = [], [], []
    real_step, real_init = SummaryMemory.step, SummaryMemory.__init__

    def step(self, token):
        if tokens is not None:
            token = tokens[len(fed)]
        fed.append(token)
        out = real_step(self, token)
        logits_log.append(out.clone())
        return out

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        memories.append(self)

    cfg = dict(cfg, eval_memory=memory)
    with monkeypatch.context() as m:
        m.setattr(SummaryMemory, "step", step)
        m.setattr(SummaryMemory, "__init__", init)
        m.setattr(rollout_mod, "sample_actions", lambda lg, u, g, t=1.0: sample_actions(lg, u, g, t))
        _, stats = rollout(model, cfg, envs.tasks_of_split(cfg, "test"), n_episodes, 1, seed=3, use_cache=use_cache)
    return torch.stack(logits_log, 1), fed, stats, memories[0]


def test_cached_rollout_equals_uncached_and_the_training_forward(data, monkeypatch):
    _, cfg, _ = data
    model = sensitive_model(cfg).eval()
    n_episodes = 7  # 70 steps: 6 writes, the memory full from the third segment on
    cached, fed, stats, mem = recorded_rollout(monkeypatch, model, cfg, True, n_episodes)
    uncached, _, stats0, mem0 = recorded_rollout(monkeypatch, model, cfg, False, n_episodes, tokens=fed)
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)
    assert stats == stats0 and stats["summary_segments_written"] == 6
    assert mem.cache is not None and mem0.cache is None
    torch.testing.assert_close(mem.summaries, mem0.summaries, atol=1e-4, rtol=1e-4)
    # the training forward over the same steps (a sample starting at the rollout's first step)
    steps = {k: torch.cat([t[k] for t in fed], 1) for k in fed[0]}
    with torch.no_grad():
        full = model(steps)[0]["action"]
    torch.testing.assert_close(full, cached, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cached[:, 0], cached[:, S])  # the policy depends on its context


def test_memory_ablation_drop_changes_what_the_decoder_reads(data, monkeypatch):
    _, cfg, _ = data
    model = sensitive_model(cfg).eval()
    keep, fed, _, _ = recorded_rollout(monkeypatch, model, cfg, True, 4)
    for memory in ("drop", "zero", "shuffle"):
        ablated, _, stats, mem = recorded_rollout(monkeypatch, model, cfg, True, 4, memory=memory, tokens=fed)
        torch.testing.assert_close(ablated[:, :S], keep[:, :S])  # the first segment has no memory to ablate
        assert (ablated[:, S:] - keep[:, S:]).abs().max() > 1e-3, memory
        assert stats["summary_segments_written"] == 3
    assert mem.visible is not None and not torch.equal(mem.visible, mem.summaries)  # shuffle: another row's


def test_the_context_never_exceeds_the_write_pass(data, monkeypatch):
    _, cfg, _ = data
    model = sensitive_model(cfg).eval()
    for n_episodes, full in ((2, False), (12, True)):
        _, _, stats, mem = recorded_rollout(monkeypatch, model, cfg, True, n_episodes)
        assert mem.cache.capacity == M * K + S + K
        if full:
            assert stats["max_context_tokens"] == M * K + S + K
            assert mem.summaries.shape[1] == M * K
        else:  # one write, with an empty memory
            assert stats["max_context_tokens"] == K + S


def test_budget_overrides_fit_the_budget():
    for budget in (10, 25, 49, 100):
        sets = dict(s.split("=") for s in summary_budget(budget, 1000))
        seg, k, m = int(sets["segment_len"]), int(sets["n_summary"]), int(sets["summary_segments"])
        assert m * k + seg + k <= budget and int(sets["train_segments"]) > m
    assert summary_budget(49, 1000)[:3] == ["segment_len=25", "n_summary=4", "summary_segments=5"]


@pytest.mark.parametrize("extra,words", [
    (["train_segments=2"], ["train_segments=2", "summary_segments=2", "train_segments >= 3"]),
    (["train_segments=21"], ["train_segments=21", "segment_len=10", "200 steps", "train_segments <= 20"]),
    (["summary_grad_segments=1"], ["summary_grad_segments=1"]),
])
def test_impossible_settings_are_refused_in_one_line(data, tmp_path, monkeypatch, capsys, extra, words):
    d, _, _ = data
    sets = cli_sets(d, tmp_path, extra=SETS + extra)
    code, err = run_in_process(monkeypatch, capsys, "train.py", train.main, [ALG, ENV, MODEL, "--set", *sets])
    assert_one_line_error(code, err, *words)
    assert not list(tmp_path.rglob("*.pt"))  # stopped before any training


def test_train_and_evaluate_end_to_end(data, tmp_path):
    d, _, _ = data
    cfg = summary_cfg(d, tmp_path)
    run_dir = train.train(cfg)
    assert run_dir.name == "SummaryAD-darkroom-seed0"
    state = torch.load(run_dir / "ckpt-last.pt", weights_only=True)
    assert state["step"] == 6 and "queries" in state["model"] and "summary_out.weight" in state["model"]
    summary, returns, _ = evaluate.evaluate_run(run_dir, {"eval_episodes": 6, "eval_rollouts": 1})
    assert returns.shape[1] == 6 and summary["max_context_tokens"] == M * K + S + K


def test_a_continuous_state_family_trains_and_rolls_out(tmp_path):
    """SummaryAD's tokens are AD's step tokens, so a Box state (the point robot's position) goes
    through the training forward and the rollout like a discrete one."""
    files = [ROOT / "config/algorithm/ppo_point_robot.yaml", ROOT / "config/env/point_robot.yaml", MODEL]
    sets = ["n_stream=2", "n_steps=30", "batch_size=30", "total_source_timesteps=240", "robot_goals=10",
            "test_stream_ratio=0.5", "tf_n_embd=16", "tf_n_layer=1", "tf_n_head=2", "train_batch_size=2",
            "warmup_steps=1", "device=cpu", f"dataset_dir={tmp_path}", f"run_dir={tmp_path}", *SETS]
    cfg = load_config(files, parse_set(sets))
    assert envs.model_inputs(cfg)["state_dim"] == 2
    build_history_file(cfg)
    run_dir = train.train(cfg)
    summary, returns, _ = evaluate.evaluate_run(run_dir, {"eval_episodes": 2, "eval_rollouts": 1})
    assert returns.shape[1] == 2 and summary["max_context_tokens"] == M * K + S + K
