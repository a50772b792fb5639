"""In-context rollouts (model/rollout.py) and evaluate.py: cached decoding equals the
uncached reference, the two-region context bound, and evaluate.py end to end on tiny
trained runs (outputs per docs/file-formats.md, comparison plot, one-line errors)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_in_process import assert_one_line_error, run_in_process
from fixtures_history import HORIZON, N_STEPS, make_cfg
from model_helpers import sensitive_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import env as envs
import evaluate
import train
from cli import run_cli, run_path
from model import rollout as rollout_mod
from model.rollout import rollout, sample_actions
from tokens import KIND_END, KIND_START, KIND_STEP

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """Two tiny trained runs side by side: AD and two-region AD."""
    runs = tmp_path_factory.mktemp("eval_runs")
    out = {}
    for name, compressed in (("AD", False), ("two_region", True)):
        cfg = make_cfg(data_dir, runs, compressed=compressed, extra=["eval_interval=0"])
        out[name] = train.train(cfg)
    return out



def recorded_rollout(monkeypatch, model, cfg, use_cache, n_episodes=8, n_rollouts=2, seed=5):
    """rollout() plus the logits and actions of every step."""
    logits_log, actions_log = [], []

    def recording(logits, uniforms, greedy, temperature=1.0):
        actions = sample_actions(logits, uniforms, greedy, temperature)
        logits_log.append(logits.clone())
        actions_log.append(actions.copy())
        return actions

    tasks = envs.tasks_of_split(cfg, "test")
    with monkeypatch.context() as m:
        m.setattr(rollout_mod, "sample_actions", recording)
        returns, stats = rollout(model, cfg, tasks, n_episodes, n_rollouts, seed=seed, use_cache=use_cache)
    assert returns.shape == (len(tasks) * n_rollouts, n_episodes)
    return returns, stats, torch.stack(logits_log), np.stack(actions_log)


VARIANTS = {"AD": (False, []), "two_region_interval": (True, ["eval_markers=interval"]),
            "two_region_model": (True, ["eval_markers=model"]),
            "two_region_model_long": (True, ["eval_markers=model", "n_transit=60"]),
            "AD_shuffle": (False, ["eval_memory=shuffle"]),  # rows swap contexts (and caches) at episode starts
            "two_region_shuffle": (True, ["eval_memory=shuffle"])}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_rollout_equals_uncached(data_dir, monkeypatch, variant):
    compressed, extra = VARIANTS[variant]
    cfg = make_cfg(data_dir, compressed=compressed, extra=extra)
    model = sensitive_model(cfg)
    r1, s1, l1, a1 = recorded_rollout(monkeypatch, model, cfg, use_cache=True)
    r0, s0, l0, a0 = recorded_rollout(monkeypatch, model, cfg, use_cache=False)
    steps = 8 * HORIZON
    assert l1.shape[0] == steps  # one decision per step
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(a1, a0)
    np.testing.assert_array_equal(r1, r0)
    assert s1 == s0
    # the context was really cut during these 80 steps (else the check misses the slide/drop path)
    if compressed:
        assert s1["max_context_tokens"] <= cfg["n_transit"] + 4 < steps
    else:
        assert s1["max_context_tokens"] == cfg["n_transit"] < steps
    # and the policy is context-dependent: same state, different logits along the rollout
    assert not torch.allclose(l1[0], l1[HORIZON])


@pytest.mark.parametrize("variant", ["AD", "two_region_model"])
def test_reencoding_a_row_at_a_time_changes_nothing(data_dir, monkeypatch, variant):
    """Long windows re-encode their context a chunk of rows at a time to bound memory; the
    outputs must be those of one pass over all rows."""
    compressed, extra = VARIANTS[variant]
    cfg = make_cfg(data_dir, compressed=compressed, extra=extra)
    model = sensitive_model(cfg)
    _, _, l_all, a_all = recorded_rollout(monkeypatch, model, cfg, use_cache=True)
    monkeypatch.setattr(rollout_mod, "ENCODING_BYTES", 1)  # one row per chunk
    assert rollout_mod.rows_per_encoding(4, 10) == 1
    _, _, l_rows, a_rows = recorded_rollout(monkeypatch, model, cfg, use_cache=True)
    torch.testing.assert_close(l_rows, l_all, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(a_rows, a_all)


def test_same_seed_same_returns_other_seed_other_actions(data_dir, monkeypatch):
    cfg = make_cfg(data_dir)
    model = sensitive_model(cfg)
    r1, _, _, a1 = recorded_rollout(monkeypatch, model, cfg, True, n_episodes=3, seed=1)
    r2, _, _, a2 = recorded_rollout(monkeypatch, model, cfg, True, n_episodes=3, seed=1)
    _, _, _, a3 = recorded_rollout(monkeypatch, model, cfg, True, n_episodes=3, seed=2)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, a3)


def test_inverse_cdf_sampling():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4, 1e-9]] * 5))
    u = np.array([0.05, 0.15, 0.35, 0.65, 0.999])
    np.testing.assert_array_equal(sample_actions(logits, u, greedy=False), [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(sample_actions(logits, u, greedy=True), [3] * 5)
    # logits that differ only by rounding give the same actions
    np.testing.assert_array_equal(sample_actions(logits + 1e-6, u, False), sample_actions(logits, u, False))


def layout_ok(kinds: list[int]) -> bool:
    """[<c>, steps, </c>, <c>, steps] or [<c>, steps] (before the first region ends)."""
    s = "".join({KIND_START: "S", KIND_STEP: "x", KIND_END: "E"}[k] for k in kinds)
    head, _, rest = s.partition("E")
    if not rest:
        return s.startswith("S") and "S" not in s[1:]
    return (head.startswith("S") and "S" not in head[1:] and rest.startswith("S") and "S" not in rest[1:]
            and "E" not in rest)


@pytest.mark.parametrize("markers,n_transit", [("interval", 40), ("model", 40), ("model", 60)])
def test_two_region_context_bound_and_region_drops(data_dir, monkeypatch, markers, n_transit):
    cfg = make_cfg(data_dir, compressed=True, extra=[f"eval_markers={markers}", f"n_transit={n_transit}"])
    model = sensitive_model(cfg, seed=1)
    lengths, drops = [], []
    real_step, real_close = rollout_mod.TwoRegions.step, rollout_mod.TwoRegions._close_regions

    def step(self, token):
        out = real_step(self, token)
        for r in range(self.batch):  # every rollout keeps its own regions
            kinds = self.ctx.row_tokens(r)["kind"].tolist()
            assert layout_ok(kinds), kinds
        lengths.append(len(self.ctx))
        return out

    def close_regions(self, ends):
        if ends[0] and self.prev_len[0]:  # row 0's previous region goes
            drops.append(int(self.prev_len[0]))
        return real_close(self, ends)

    monkeypatch.setattr(rollout_mod.TwoRegions, "step", step)
    monkeypatch.setattr(rollout_mod.TwoRegions, "_close_regions", close_regions)
    n_episodes = 10
    _, stats = rollout(model, cfg, envs.tasks_of_split(cfg, "test"), n_episodes, 2, seed=0)
    assert stats["max_context_tokens"] <= n_transit + 4
    assert max(lengths) <= n_transit + 4
    assert len(drops) >= 2 and all(d >= 3 for d in drops)  # whole regions (steps + 2 markers) go
    if markers == "interval":
        assert stats["region_lengths_mean"] == N_STEPS
        # [<c> previous region </c> <c> current region]: a region's </c> is added once its
        # previous region is gone, so the most tokens attended are n_transit + 3 here
        assert stats["max_context_tokens"] == 2 * N_STEPS + 3
        assert len(drops) == n_episodes * HORIZON // N_STEPS - 1
        assert set(drops) == {N_STEPS + 2}
    else:
        assert 1 <= stats["region_lengths_mean"] <= n_transit // 2
        assert stats["forced_region_ends"] >= 0


def random_tokens(cfg, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"kind": torch.full((n,), KIND_STEP), "state": torch.randint(0, envs.n_state_tokens(cfg), (n,), generator=g),
            "prev_action": torch.randint(0, envs.n_actions(cfg) + 1, (n,), generator=g),
            "prev_reward": torch.randint(0, 2, (n,), generator=g).float(),
            "new_episode": torch.randint(0, 2, (n,), generator=g)}


@pytest.mark.parametrize("use_cache", [True, False])
def test_padded_rows_give_the_outputs_of_each_row_alone(data_dir, use_cache):
    """Rollouts whose regions end at different steps hold different numbers of tokens; a
    row's outputs must not depend on the padding that lines it up with the others, nor on
    another row's tokens being replaced."""
    cfg = make_cfg(data_dir, compressed=True)
    model = sensitive_model(cfg).eval()
    rows = [random_tokens(cfg, n, seed=n) for n in (3, 9, 6)]
    ctx = rollout_mod.Context(model, 3, 32, "cpu", use_cache)
    ctx.replace_rows(np.ones(3, dtype=bool), rows)
    assert ctx.ragged and len(ctx) == 9
    alone = [rollout_mod.Context(model, 1, 32, "cpu", use_cache) for _ in rows]
    for a, row in zip(alone, rows):
        a.append({k: v[None] for k, v in row.items()})

    def check_next_tokens(seed):
        new = [random_tokens(cfg, 3, seed=seed + i) for i in range(3)]
        for i in range(3):
            together = ctx.append({k: torch.stack([t[k][i:i + 1] for t in new]) for k in new[0]})["action"]
            for r, a in enumerate(alone):
                one = a.append({k: v[None, i:i + 1] for k, v in new[r].items()})["action"][0]
                torch.testing.assert_close(together[r], one,
                                           atol=1e-4, rtol=1e-4)

    check_next_tokens(100)
    assert all(torch.equal(ctx.row_tokens(1)[k][:9], rows[1][k]) for k in rows[1])
    # row 1 (the longest) starts over with 2 tokens: the others keep theirs, shifted left
    fresh = random_tokens(cfg, 2, seed=7)
    ctx.replace_rows(np.array([False, True, False]), [fresh])
    alone[1] = rollout_mod.Context(model, 1, 32, "cpu", use_cache)
    alone[1].append({k: v[None] for k, v in fresh.items()})
    assert len(ctx) == 6 + 3
    check_next_tokens(200)


def test_each_rollout_ends_its_own_regions(data_dir, monkeypatch):
    """eval_markers=model: one decision per rollout, not a vote over the batch. A head that
    says </compress> for row 0 only ends row 0's regions."""
    cfg = make_cfg(data_dir, compressed=True, extra=["eval_markers=model", "n_transit=40"])
    model = sensitive_model(cfg)
    real_forward = type(model).forward

    def row0_ends_every_5th_step(self, tokens, targets=None, cache=None, mask=None, pos=None):
        logits, loss = real_forward(self, tokens, targets, cache, mask, pos)
        type_logits = torch.zeros_like(logits["next_kind"])
        type_logits[..., KIND_STEP] = 1.0
        steps_in_region = (policy.cur_steps[0] + 1) if policy is not None else 0
        if steps_in_region and steps_in_region % 5 == 0:
            type_logits[0, -1, KIND_END] = 2.0
        return logits | {"next_kind": type_logits}, loss

    policy = None
    real_make = rollout_mod.make_policy_context

    def make(*a, **kw):
        nonlocal policy
        ctx, policy = real_make(*a, **kw)
        return ctx, policy

    monkeypatch.setattr(type(model), "forward", row0_ends_every_5th_step)
    monkeypatch.setattr(rollout_mod, "make_policy_context", make)
    _, stats = rollout(model, cfg, envs.tasks_of_split(cfg, "test")[:1], 4, 2, seed=0)
    n_steps = 4 * cfg["horizon"]
    # row 0: a region every 5 steps, from the head; row 1: only the forced ends at n_transit // 2
    assert stats["region_ends_from_head"] == n_steps // 5
    assert stats["forced_region_ends"] == n_steps // (cfg["n_transit"] // 2)
    kinds = [policy.ctx.row_tokens(r)["kind"] for r in range(2)]
    assert (kinds[0] == KIND_STEP).sum() < (kinds[1] == KIND_STEP).sum()


def test_ad_window_slides_within_bounds(data_dir, monkeypatch):
    cfg = make_cfg(data_dir)
    model = sensitive_model(cfg)
    lengths = []
    real_step = rollout_mod.SlidingWindow.step

    def step(self, token):
        out = real_step(self, token)
        lengths.append(len(self.ctx))
        assert (self.ctx.tokens["kind"] == KIND_STEP).all()
        return out

    monkeypatch.setattr(rollout_mod.SlidingWindow, "step", step)
    _, stats = rollout(model, cfg, [0], 8, 1, seed=0)
    n, slide = cfg["n_transit"], cfg["n_transit"] // 4
    assert stats["max_context_tokens"] == n == max(lengths)
    assert min(lengths[n:]) == n - slide + 1


# ----------------------------------------------------------------------------- evaluate.py

def run_evaluate(args, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *[str(a) for a in args]],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


EVAL_SET = ["--set", "eval_episodes=6", "eval_rollouts=2", "device=cpu"]


@pytest.fixture(scope="module")
def evaluated(trained):
    proc = run_evaluate([trained["AD"], trained["two_region"], *EVAL_SET])
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


@pytest.mark.parametrize("name", ["AD", "two_region"])
def test_evaluate_outputs(trained, evaluated, name):
    run_dir = trained[name]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    test_tasks = envs.tasks_of_split(cfg, "test")
    all_tasks = envs.task_list(cfg)
    returns = np.load(run_dir / "eval_result.npy")
    assert returns.shape == (len(test_tasks) * 2, 6)
    assert ((returns >= 0) & (returns <= HORIZON)).all()
    s = json.loads((run_dir / "eval_summary.json").read_text())
    for key in ("tasks", "split", "optimal_return", "n_episodes", "first_return", "final_return",
                "final_fraction_of_optimal", "max_context_tokens", "steps_per_second"):
        assert key in s, key
    rows = [i for i in test_tasks for _ in range(2)]  # task-major, one row per rollout
    assert s["tasks"] == [all_tasks[i] for i in rows]
    assert s["split"] == ["test"] * len(rows)
    optimal = [envs.optimal_return(cfg, all_tasks[i]) for i in rows]
    assert s["optimal_return"] == pytest.approx(optimal)
    assert s["n_episodes"] == 6
    assert s["source_alg"] == cfg["alg"] == "PPO"  # whose curve source_episodes_to_80pct is
    assert s["first_return"] == pytest.approx(float(returns[:, 0].mean()))
    assert s["final_return"] == pytest.approx(float(returns[:, -1].mean()))
    assert s["final_fraction_of_optimal"] == pytest.approx(returns[:, -1].mean() / np.mean(optimal))
    assert s["steps_per_second"] > 0
    if name == "AD":
        assert s["max_context_tokens"] == cfg["n_transit"]  # 60 steps through a 40-step window
    else:
        assert 0 < s["max_context_tokens"] <= cfg["n_transit"] + 4
    assert s["train_step"] == cfg["train_timesteps"]
    assert (run_dir / "eval_curve.png").read_bytes()[:8] == PNG
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval_curve/return")] == list(range(6))
    source = [e.value for e in acc.Scalars("eval_curve/source_return")]
    assert len(source) > 0 and all(0.0 <= v <= cfg["horizon"] for v in source)


def test_an_unfinished_run_is_evaluated_with_a_note_saying_so(trained, tmp_path, capsys):
    cfg, model, step = evaluate.load_run(trained["AD"], {})
    evaluate.evaluate_run(trained["AD"], {}, "unfinished", (cfg, model, step - 1))
    err = capsys.readouterr().err
    assert f"stopped training at step {step - 1:,} of {cfg['train_timesteps']:,}" in err


def test_the_plotted_band_is_an_interval_of_the_mean_within_the_returns_range():
    returns = np.zeros((40, 3))
    returns[:4] = 20.0  # a few rows at the top: +-1 std would reach below 0
    low, high = evaluate.mean_interval(returns)
    mean = returns.mean(0)
    assert np.all(low >= 0) and np.all(low <= mean) and np.all(mean <= high) and np.all(high <= 20)
    assert np.all(mean - returns.std(0) < 0)  # what the band used to be


def test_evaluate_comparison_plot(trained, evaluated):
    plot = trained["AD"].parent / "eval_comparison.png"
    assert plot.read_bytes()[:8] == PNG
    assert str(plot) in evaluated.stdout


def test_evaluate_is_reproducible(trained, evaluated, monkeypatch):
    """Same run and seed in this process: the same eval_result.npy as the subprocess wrote."""
    run_dir = trained["AD"]
    before = np.load(run_dir / "eval_result.npy")
    monkeypatch.setattr(sys, "argv", ["evaluate.py", str(run_dir), *EVAL_SET])
    run_cli(evaluate.main)
    np.testing.assert_array_equal(np.load(run_dir / "eval_result.npy"), before)


def evaluate_in_process(monkeypatch, capsys, args) -> tuple[int, str]:
    return run_in_process(monkeypatch, capsys, "evaluate.py", evaluate.main, args)



def test_missing_run_dir_exits_2(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "runs" / "AD-darkroom-seed9"
    code, err = evaluate_in_process(monkeypatch, capsys, [missing])
    assert_one_line_error(code, err, str(missing))


def test_run_without_checkpoint_exits_2(trained, tmp_path, monkeypatch, capsys):
    run = tmp_path / "AD-darkroom-seed0"
    run.mkdir()
    (run / "config.yaml").write_text((trained["AD"] / "config.yaml").read_text())
    code, err = evaluate_in_process(monkeypatch, capsys, [run])
    assert_one_line_error(code, err, "checkpoint", str(run))
    assert not (run / "eval_result.npy").exists()


def test_checkpoint_that_does_not_fit_exits_2(trained):
    run = trained["AD"]
    proc = run_evaluate([run, "--set", "tf_n_embd=32", "eval_episodes=1", "eval_rollouts=1"])
    assert_one_line_error(proc.returncode, proc.stderr, "ckpt-last.pt", "does not fit")


def test_damaged_checkpoint_exits_2(trained, tmp_path, monkeypatch, capsys):
    run = tmp_path / "AD-darkroom-seed0"
    run.mkdir()
    (run / "config.yaml").write_text((trained["AD"] / "config.yaml").read_text())
    data = (trained["AD"] / "ckpt-last.pt").read_bytes()
    (run / "ckpt-last.pt").write_bytes(data[: len(data) // 2])
    code, err = evaluate_in_process(monkeypatch, capsys, [run])
    assert_one_line_error(code, err, "ckpt-last.pt")


def test_run_dir_of_train_matches_evaluate(trained, data_dir):
    cfg = make_cfg(data_dir, trained["AD"].parent, extra=["eval_interval=0"])
    assert run_path(cfg) == trained["AD"]


def test_temperature_sharpens_sampling():
    """softmax(logits / T): at T=0.5 the probabilities are p^2 renormalised, so the same
    uniforms pick the likely action more often."""
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4, 1e-9]] * 5))
    u = np.array([0.05, 0.15, 0.35, 0.65, 0.999])
    # p^2 / sum = [1, 4, 9, 16] / 30 -> cdf [0.033, 0.167, 0.467, 1.0]
    np.testing.assert_array_equal(sample_actions(logits, u, False, temperature=0.5), [1, 1, 2, 3, 3])
    np.testing.assert_array_equal(sample_actions(logits, u, False, temperature=1.0), [0, 1, 2, 3, 3])


@pytest.mark.parametrize("key", ["env_split_seed=3", "val_env_ratio=0.3", "n_stream=2"])
def test_evaluating_with_other_data_settings_is_refused(trained, monkeypatch, capsys, key):
    """Another split would evaluate, and label 'test', tasks the run was trained on."""
    code, err = evaluate_in_process(monkeypatch, capsys, [trained["AD"], "--set", key])
    assert_one_line_error(code, err, key.split("=")[0], "drop these --set keys")
    assert not (trained["AD"] / "eval_summary_x.json").exists()


def test_the_set_example_of_evaluate_help_is_one_evaluate_accepts(capsys):
    """evaluate.py keeps a run's data and split: its --help example may only change evaluation keys."""
    from config.schema import SCHEMA
    argv, sys.argv = sys.argv, ["evaluate.py", "--help"]
    try:
        with pytest.raises(SystemExit):
            evaluate.main()
    finally:
        sys.argv = argv
    text = " ".join(capsys.readouterr().out.split())
    example = text.split("override config keys, e.g. --set ")[1].split("--plot")[0].split()
    assert example and all(SCHEMA[item.split("=")[0]].section == "evaluation" for item in example)


def test_plot_runs_draws_saved_evaluations_without_a_rollout(trained, evaluated, tmp_path, monkeypatch):
    """scripts/plot_runs.py redraws the comparison from the saved outputs; no rollout runs."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import plot_runs
    monkeypatch.setattr(evaluate, "rollout", lambda *a, **k: pytest.fail("a rollout ran"))
    out = tmp_path / "plot.png"
    plot_runs.main([str(trained["AD"]), str(trained["two_region"]), "--out", str(out), "--labels", "AD", "two"])
    assert out.read_bytes()[:8] == PNG


def test_plot_runs_refuses_evaluations_of_other_tasks(trained, evaluated, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import plot_runs
    other = tmp_path / trained["two_region"].name
    shutil.copytree(trained["two_region"], other)
    summary = json.loads((other / "eval_summary.json").read_text())
    summary["task_indices"] = summary["task_indices"][::-1]
    (other / "eval_summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(sys, "argv", ["plot_runs.py", str(trained["AD"]), str(other), "--out", str(tmp_path / "p.png")])
    with pytest.raises(SystemExit) as e:
        run_cli(plot_runs.main)
    assert e.value.code == 2 and "other tasks" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
