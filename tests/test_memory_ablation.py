"""The memory ablation (`eval_memory`) really switches the memory off, for every variant.

- window variants (AD, two-region), 'drop': at the first step of every episode the context
  holds that step's token only (plus the open <compress> marker), and the action logits are
  those of a fresh context holding just it; 'shuffle': the older tokens are another
  task's rollout's, row for row;
- CompressedAD: after every compression the decoder reads no latents ('drop'), zeros
  ('zero') or another task's latents ('shuffle'), while the encoder keeps folding the
  true ones;
- with a model whose outputs depend on the context, 'drop' changes the actions ('keep'
  does not), so an ablation that silently does nothing fails here.
"""
import numpy as np
import pytest
import torch
from fixtures_history import make_cfg

import env as envs
import model.rollout as rollout_mod
from model import build
from model.rollout import other_task_rows, rollout
from tokens import KIND_START, KIND_STEP

N_EPISODES, N_ROLLOUTS = 4, 2
COMPRESSED_SETS = ["model=CompressedAD", "n_transit=20", "n_latent=3", "enc_n_layer=1", "max_compression_depth=2"]
VARIANTS = {"AD": {}, "two-region": {"compressed": True, "extra": ["eval_markers=interval"]},
            "CompressedAD": {"extra": COMPRESSED_SETS}}


def cfg_of(data_dir, variant: str, memory: str) -> dict:
    kw = VARIANTS[variant]
    extra = list(kw.get("extra", ())) + [f"eval_memory={memory}"]
    return make_cfg(data_dir, compressed=kw.get("compressed", False), extra=extra)


def sensitive_model(cfg: dict):
    """Weights large enough that the outputs depend strongly on the whole context."""
    torch.manual_seed(0)
    model = build(cfg, envs.model_inputs(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def recorded(monkeypatch, cfg, model=None):
    """rollout() on the test tasks with, per step, the logits and the number of step tokens in
    the context just after the step, and the (context, policy) pair it used."""
    model = model or sensitive_model(cfg)
    log = {"logits": [], "lengths": [], "starts": []}
    made = []
    real_make = rollout_mod.make_policy_context

    def make(*a, **kw):
        ctx, policy = real_make(*a, **kw)
        real_step, real_start = policy.step, policy.start_episode

        def step(token):
            logits = real_step(token)
            log["logits"].append(logits.clone())
            log["lengths"].append(int((ctx.row_tokens(0)["kind"] == KIND_STEP).sum()) if hasattr(ctx, "tokens") else None)
            return logits

        def start_episode():
            before = {k: v.clone() for k, v in ctx.tokens.items()} if hasattr(ctx, "tokens") else None
            forgot = real_start()
            after = {k: v.clone() for k, v in ctx.tokens.items()} if hasattr(ctx, "tokens") else None
            log["starts"].append((before, after))
            return forgot

        policy.step, policy.start_episode = step, start_episode
        made.append((ctx, policy))
        return ctx, policy

    tasks = envs.tasks_of_split(cfg, "test")[:2]
    with monkeypatch.context() as m:
        m.setattr(rollout_mod, "make_policy_context", make)
        returns, stats = rollout(model, cfg, tasks, N_EPISODES, N_ROLLOUTS, seed=3)
    return returns, stats, log, made[0], model


@pytest.mark.parametrize("variant", ["AD", "two-region"])
def test_window_memory_off_leaves_only_the_current_episode(data_dir, monkeypatch, variant):
    cfg = cfg_of(data_dir, variant, "drop")
    _, _, log, _, model = recorded(monkeypatch, cfg)
    H = cfg["horizon"]
    first_steps = range(H, N_EPISODES * H, H)
    assert all(log["lengths"][t] == 1 for t in first_steps)
    assert len(log["starts"]) == N_EPISODES - 1
    _, _, keep_log, _, _ = recorded(monkeypatch, cfg_of(data_dir, variant, "keep"), model)
    assert min(keep_log["lengths"][t] for t in first_steps) > 1  # 'keep' does remember


@pytest.mark.parametrize("variant", ["AD", "two-region"])
def test_window_memory_off_logits_equal_a_fresh_context(data_dir, monkeypatch, variant):
    """Recompute the first step of the last episode from scratch: only its own token (and the
    open marker) may matter."""
    cfg = cfg_of(data_dir, variant, "drop")
    _, _, log, (ctx, _), model = recorded(monkeypatch, cfg)
    H = cfg["horizon"]
    t = (N_EPISODES - 1) * H
    # the context now holds the last episode from its first step on
    offset = 1 if variant == "two-region" else 0
    start = {k: v[:, :1 + offset] for k, v in ctx.tokens.items()}
    if variant == "two-region":
        assert (start["kind"][:, 0] == KIND_START).all()
    assert (start["kind"][:, offset] == KIND_STEP).all() and (start["new_episode"][:, offset] == 1).all()
    # not even the last action and reward of the previous episode: as at a history's start
    assert (start["prev_action"][:, offset] == envs.n_actions(cfg)).all() and not start["prev_reward"].any()
    with torch.no_grad():
        fresh_logits = model(start)[0]["action"][:, -1]
    torch.testing.assert_close(log["logits"][t], fresh_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["AD", "two-region"])
def test_window_memory_shuffle_gives_each_row_another_tasks_history(data_dir, monkeypatch, variant):
    cfg = cfg_of(data_dir, variant, "shuffle")
    _, _, log, _, _ = recorded(monkeypatch, cfg)
    perm = other_task_rows(2 * N_ROLLOUTS, N_ROLLOUTS)
    assert perm.tolist() == [2, 3, 0, 1]  # rows of the other task, same rollout index
    for before, after in log["starts"]:
        for k in before:
            torch.testing.assert_close(after[k], before[k][perm])
        assert not torch.equal(after["state"], before["state"])


def test_compressed_ad_ablations_act_on_what_the_decoder_reads(data_dir, monkeypatch):
    runs = {m: recorded(monkeypatch, cfg_of(data_dir, "CompressedAD", m)) for m in ("keep", "drop", "zero", "shuffle")}
    for memory, (_, stats, _, (mem, _), _) in runs.items():
        assert stats["compression_depth_reached"] >= 2, memory
        assert mem.latents is not None  # the encoder always folds the true history
    _, _, _, (keep, _), _ = runs["keep"]
    _, _, _, (off, _), _ = runs["drop"]
    _, _, _, (zero, _), _ = runs["zero"]
    _, _, _, (shuffled, _), _ = runs["shuffle"]
    torch.testing.assert_close(keep.visible, keep.latents)
    assert off.visible is None
    assert zero.visible is not None and not zero.visible.any()
    torch.testing.assert_close(shuffled.visible, shuffled.latents[other_task_rows(2 * N_ROLLOUTS, N_ROLLOUTS)])
    # 'drop' decodes from the recent steps alone: its context is K tokens shorter
    assert runs["drop"][1]["max_context_tokens"] == runs["keep"][1]["max_context_tokens"] - 3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_switching_memory_off_changes_the_actions(data_dir, monkeypatch, variant):
    keep = recorded(monkeypatch, cfg_of(data_dir, variant, "keep"))
    again = recorded(monkeypatch, cfg_of(data_dir, variant, "keep"))
    off = recorded(monkeypatch, cfg_of(data_dir, variant, "drop"))
    np.testing.assert_array_equal(keep[0], again[0])  # deterministic, so a difference is the ablation
    H = cfg_of(data_dir, variant, "keep")["horizon"]
    same_first_episode = all(torch.equal(a, b) for a, b in zip(keep[2]["logits"][:H], off[2]["logits"][:H]))
    later = torch.stack(keep[2]["logits"][2 * H:]) - torch.stack(off[2]["logits"][2 * H:])
    assert later.abs().max() > 1e-3
    if variant != "CompressedAD":  # nothing is forgotten before the first episode ends
        assert same_first_episode
