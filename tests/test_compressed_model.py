"""CompressedAD (model/compressed.py): pad invariance of the encoder, gradients through the
last `grad_compression_rounds` rounds, LatentMemory rollouts (cached = uncached, constant
memory) and train.py end to end with model=CompressedAD. Set-up in compressed_helpers.py.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from compressed_helpers import (  # noqa: F401 - fixtures
    MAX_DEPTH,
    N_LATENT,
    N_TRANSIT,
    STAGE,
    STEPS,
    compressed_cfg,
    data,
    depth2_items_with_uneven_stages,
    first_of_depth,
    sensitive_compressed_model,
    small,
)
from model_helpers import assert_same_state, interrupted_then_resumed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import env as envs
import train
from cli import run_path
from dataset import BucketBatches, BucketSampler, CompressedADDataset, collate_compressed_batch
from model import build
from model import rollout as rollout_mod
from model.ad import KVCache, _cross_entropy
from model.compressed import LatentMemory, split_compressed_batch
from model.rollout import cat_steps, rollout, sample_actions

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
    model = sensitive_compressed_model(cfg)
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
    model = sensitive_compressed_model(cfg, grad_rounds=1).train()
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
    model = sensitive_compressed_model(cfg)
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


def rollout_with_its_tokens(monkeypatch, model, cfg, n_episodes: int):
    """recorded_rollout of one rollout per task, plus the step tokens LatentMemory received."""
    tokens = []
    real_step = LatentMemory.step

    def step(self, token):
        tokens.append({k: v.clone() for k, v in token.items()})
        return real_step(self, token)

    monkeypatch.setattr(LatentMemory, "step", step)
    return tokens, recorded_rollout(monkeypatch, model, cfg, True, n_episodes=n_episodes, n_rollouts=1)


def stages_of(tokens: list[dict], depth: int) -> list[dict]:
    """The first `depth` stages of STAGE one-step tokens each, as training batches them (no padding)."""
    stages = []
    for i in range(depth):
        st = cat_steps(tokens[i * STAGE:(i + 1) * STAGE])
        st["mask"] = torch.ones_like(st["state"], dtype=torch.bool)
        stages.append(st)
    return stages


def test_rollout_latents_are_the_training_fold_of_the_oldest_stages(data, monkeypatch):
    """What LatentMemory holds after a rollout is what training computes for the same steps:
    latents_of(stages of stage_len oldest steps, oldest first), then decode(latents, recent)."""
    _, cfg, _, _ = data
    model = sensitive_compressed_model(cfg)
    tokens, (_, stats, logits, _, mem) = rollout_with_its_tokens(monkeypatch, model, cfg, n_episodes=9)
    steps = 9 * cfg["horizon"]  # 90 steps: stages 0..19, 20..39, 40..59; recent 60..89
    assert stats["compression_depth_reached"] == mem.depth == 3
    stages = stages_of(tokens, 3)
    with torch.no_grad():
        latents = model.latents_of(stages)
        last = model.decode(latents, cat_steps(tokens[3 * STAGE:steps]))[:, -1]
    torch.testing.assert_close(mem.latents, latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[-1], last, atol=1e-4, rtol=1e-4)


def test_compression_depth_grows_with_episodes(data, monkeypatch):
    _, cfg, _, _ = data
    model = sensitive_compressed_model(cfg)
    reached = []
    for n_episodes in (3, 5, 8):
        _, stats, _, _, mem = recorded_rollout(monkeypatch, model, cfg, True, n_episodes, n_rollouts=1)
        assert stats["compression_depth_reached"] == mem.depth == depth_after(n_episodes * cfg["horizon"])
        reached.append(stats["compression_depth_reached"])
    assert reached == [0, 1, 2]


def test_rollout_memory_does_not_grow_with_the_history(data, monkeypatch):
    _, cfg, _, _ = data
    model = sensitive_compressed_model(cfg)
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


@pytest.mark.parametrize("reads_latents", [True, False])
def test_accumulated_latent_sets_are_the_training_fold_and_bound_the_context(data, monkeypatch, reads_latents):
    """latent_sets=3: the decoder reads the newest three sets side by side, in a rollout as in
    training; without encoder_reads_latents each set is its own stage's summary alone."""
    _, cfg, _, _ = data
    model = sensitive_compressed_model(cfg)
    model.latent_sets, model.encoder_reads_latents = 3, reads_latents
    tokens, (_, stats, logits, _, mem) = rollout_with_its_tokens(monkeypatch, model, cfg, n_episodes=12)
    depth = depth_after(12 * cfg["horizon"])  # 4 compressions: one set more than the decoder reads
    assert stats["compression_depth_reached"] == mem.depth == depth == 4
    assert stats["max_context_tokens"] == 3 * N_LATENT + N_TRANSIT and mem.visible.shape[1] == 3 * N_LATENT
    stages = stages_of(tokens, depth)
    with torch.no_grad():
        latents = model.latents_of(stages)
        last = model.decode(latents, cat_steps(tokens[depth * STAGE:]))[:, -1]
        alone = model.encoder(None, model.embed(stages[-1]), stages[-1]["mask"])
    torch.testing.assert_close(mem.visible, latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[-1], last, atol=1e-4, rtol=1e-4)
    # the newest set is the last stage's summary alone exactly when the encoder does not read latents
    assert torch.allclose(latents[:, -N_LATENT:], alone, atol=1e-5) == (not reads_latents)
    _, _, uncached, _, _ = recorded_rollout(monkeypatch, model, cfg, False, n_episodes=12, n_rollouts=1)
    torch.testing.assert_close(logits, uncached, atol=1e-4, rtol=1e-4)


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


def test_train_compressed_ad_resume_is_exact(data, trained, tmp_path, monkeypatch):
    d, _, _, _ = data
    cfg_a, run_a = trained
    cfg_b = compressed_cfg(d, tmp_path / "B", extra=["eval_episodes=6"])
    left, b = interrupted_then_resumed(monkeypatch, cfg_b, kill_at_step=6)
    assert left["step"] == 4  # ckpt_interval=4
    assert_same_state(torch.load(run_a / "ckpt-last.pt", weights_only=True), b, STEPS)
