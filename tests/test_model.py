"""The AD transformer (model/ad.py): causality, no action leaking into its own prediction,
KV-cache decoding equal to a full forward, loss masks and weights, rotary positions.

Token batches come from ADDataset over a tiny random-policy history (tests/fixtures_history.py),
so the checks run on exactly the layouts training uses: standard windows and two-region
samples [<compress>, region k-1, </compress>, <compress>, region k, </compress>].
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_history import build_history_file, make_cfg, read_stream

import env as envs
from dataset import ADDataset
from model import build
from model.ad import AD, ModelConfig, build_model, rotate, split_targets
from tokens import IGNORE, KIND_END, KIND_START, KIND_STEP, concat_tokens, region_tokens, window_tokens

MODES = ["standard", "two_region"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("model_data")
    cfgs = {"standard": make_cfg(d, d / "runs"), "two_region": make_cfg(d, d / "runs", compressed=True)}
    path = build_history_file(cfgs["standard"])
    return cfgs, path


def to_batch(samples: list[dict]) -> dict:
    out = {k: torch.as_tensor(np.stack([s[k] for s in samples])) for k in samples[0]}
    out["prev_reward"] = out["prev_reward"].float()
    return out


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("action", "next_kind")}


def sensitive_model(cfg: dict, seed: int = 0) -> AD:
    """A model whose outputs depend strongly on every input (the default init is so small that
    a broken mask or position could hide in the noise)."""
    torch.manual_seed(seed)
    model = build(cfg, envs.model_inputs(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def sample_batch(cfg, path, indices=(0, 7, 31)) -> dict:
    ds = ADDataset(path, cfg)
    return to_batch([ds[i] for i in indices])


def heads(logits: dict):
    """(action logits, token-type logits or None)."""
    return logits["action"], logits.get("next_kind")


def forward(model, tokens, **kw):
    with torch.no_grad():
        return heads(model(inputs(tokens), **kw)[0])


def loss_and_metrics(model, batch: dict):
    """What train.py computes on a batch: model(tokens, targets) and model.metrics."""
    tokens, targets = split_targets(batch)
    logits, loss = model(tokens, targets)
    return loss, model.metrics(tokens, logits, targets)


# ----------------------------------------------------------------------------- causality

@pytest.mark.parametrize("mode", MODES)
def test_no_leakage_from_the_future(data, mode):
    cfgs, path = data
    cfg = cfgs[mode]
    model = sensitive_model(cfg)
    batch = sample_batch(cfg, path)
    L = batch["kind"].shape[1]
    base_a, base_t = forward(model, batch)
    g = torch.Generator().manual_seed(1)
    for t in (0, 5, L // 2, L - 2):
        changed = {k: v.clone() for k, v in batch.items()}
        future = slice(t + 1, L)
        shape = changed["state"][:, future].shape
        changed["state"][:, future] = torch.randint(0, envs.n_state_tokens(cfg), shape, generator=g)
        changed["prev_action"][:, future] = torch.randint(0, envs.n_actions(cfg) + 1, shape, generator=g)
        changed["prev_reward"][:, future] = torch.rand(shape, generator=g) * 3
        changed["new_episode"][:, future] = 1 - changed["new_episode"][:, future]
        if mode == "two_region":  # also turn future steps into markers and back
            kinds = changed["kind"][:, future]
            changed["kind"][:, future] = torch.where(kinds == KIND_STEP, KIND_END, KIND_STEP)
        a, ty = forward(model, changed)
        torch.testing.assert_close(a[:, :t + 1], base_a[:, :t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(a[:, t + 1:], base_a[:, t + 1:], atol=1e-4), "future change had no effect"
        if mode == "two_region":
            torch.testing.assert_close(ty[:, :t + 1], base_t[:, :t + 1], atol=1e-6, rtol=0)
        else:
            assert ty is None and base_t is None


def modified_stream(path, task, stream, t, n_actions):
    raw = read_stream(path, task, stream)
    changed = {k: v.copy() for k, v in raw.items()}
    changed["actions"][t] = (raw["actions"][t] + 1) % n_actions
    return raw, changed


@pytest.mark.parametrize("mode", MODES)
def test_action_is_never_an_input_of_its_own_prediction(data, mode):
    """Change a_t in the data: the logits of the token that predicts a_t (and before) stay,
    the next step's logits (which see a_t as prev_action) change."""
    cfgs, path = data
    cfg = cfgs[mode]
    model = sensitive_model(cfg)
    task = ADDataset(path, cfg).tasks[0]
    n_actions = envs.n_actions(cfg)
    if mode == "standard":
        a, n = 10, cfg["n_transit"]
        cases = [(a + 0, 0), (a + 7, 7), (a + 25, 25)]  # (step t in the file, its token position)

        def tokens_of(stream):
            return window_tokens(cfg, stream, a, a + n)
    else:
        k, I = 3, cfg["compress_interval"]

        def tokens_of(stream):
            return concat_tokens(region_tokens(cfg, stream, (k - 1) * I, k * I) + region_tokens(cfg, stream, k * I, (k + 1) * I))
        # region k-1 steps sit at positions 1..I, region k steps at I + 3 .. 2I + 2
        cases = [((k - 1) * I + 4, 1 + 4), (k * I + 0, I + 3), (k * I + 9, I + 3 + 9)]
    for t, p in cases:
        raw, changed = modified_stream(path, task, 1, t, n_actions)
        tok_raw, tok_changed = tokens_of(raw), tokens_of(changed)
        assert tok_raw["kind"][p] == KIND_STEP and tok_raw["action"][p] == raw["actions"][t]  # p predicts a_t
        assert tok_changed["action"][p] != tok_raw["action"][p]
        a0, _ = forward(model, to_batch([tok_raw]))
        a1, _ = forward(model, to_batch([tok_changed]))
        torch.testing.assert_close(a1[:, :p + 1], a0[:, :p + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(a1[:, p + 1], a0[:, p + 1], atol=1e-4), (t, p)


# ----------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunks", ["one_at_a_time", "chunks"])
def test_kv_cache_equals_full_forward(data, mode, chunks):
    cfgs, path = data
    cfg = cfgs[mode]
    model = sensitive_model(cfg)
    batch = inputs(sample_batch(cfg, path))
    B, L = batch["kind"].shape
    full_a, full_t = forward(model, batch)
    sizes = [1] * L if chunks == "one_at_a_time" else [3, 1, 7, 2, 11, 5]
    sizes = sizes + [L - sum(sizes)] if sum(sizes) < L else sizes
    cache = model.new_cache(B, L, torch.device("cpu"))
    got_a, got_t, start = [], [], 0
    with torch.no_grad():
        for n in sizes:
            a, ty = heads(model({k: v[:, start:start + n] for k, v in batch.items()}, cache=cache)[0])
            got_a.append(a)
            got_t.append(ty)
            start += n
    assert start == L and cache.length == L
    torch.testing.assert_close(torch.cat(got_a, 1), full_a, atol=1e-5, rtol=0)
    if mode == "two_region":
        torch.testing.assert_close(torch.cat(got_t, 1), full_t, atol=1e-5, rtol=0)


def test_kv_cache_refuses_to_overflow(data):
    cfgs, path = data
    model = sensitive_model(cfgs["standard"])
    batch = inputs(sample_batch(cfgs["standard"], path))
    cache = model.new_cache(3, 4, torch.device("cpu"))
    with torch.no_grad():
        model({k: v[:, :4] for k, v in batch.items()}, cache=cache)
        with pytest.raises(RuntimeError, match="KV cache full"):
            model({k: v[:, 4:5] for k, v in batch.items()}, cache=cache)


# ----------------------------------------------------------------------------- losses

def test_marker_tokens_have_no_action_target_and_loss_counts_steps_only(data):
    cfgs, path = data
    cfg = cfgs["two_region"]
    model = sensitive_model(cfg)
    batch = sample_batch(cfg, path)
    kind, action = batch["kind"], batch["action"]
    assert (action[kind != KIND_STEP] == IGNORE).all()
    assert (action[kind == KIND_STEP] >= 0).all()
    with torch.no_grad():
        loss, metrics = loss_and_metrics(model, batch)
        logits, type_logits = forward(model, batch)
    steps = kind == KIND_STEP
    want = F.cross_entropy(logits[steps], action[steps])
    assert metrics["loss_action"] == pytest.approx(want.item(), rel=1e-5)
    acc = (logits[steps].argmax(-1) == action[steps]).float().mean().item()
    assert metrics["acc_action"] == pytest.approx(acc)
    valid = batch["next_kind"] != IGNORE
    weight = torch.tensor([1.0, 1.0, cfg["region_end_weight"]])  # region ends weighted (see the test below)
    want_type = F.cross_entropy(type_logits[valid], batch["next_kind"][valid], weight=weight)
    assert metrics["loss_token_type"] == pytest.approx(want_type.item(), rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_ignored_action_targets_do_not_affect_the_loss(data, mode):
    cfgs, path = data
    cfg = cfgs[mode]
    model = sensitive_model(cfg)
    batch = sample_batch(cfg, path)
    masked = {k: v.clone() for k, v in batch.items()}
    drop = torch.zeros_like(batch["action"], dtype=torch.bool)
    drop[:, 2:9] = True
    drop &= batch["action"] != IGNORE
    masked["action"][drop] = IGNORE
    with torch.no_grad():
        _, m_full = loss_and_metrics(model, batch)
        _, m_masked = loss_and_metrics(model, masked)
        logits, _ = forward(model, batch)
    keep = masked["action"] != IGNORE
    want = F.cross_entropy(logits[keep], masked["action"][keep]).item()
    assert m_masked["loss_action"] == pytest.approx(want, rel=1e-5)
    assert m_masked["loss_action"] != pytest.approx(m_full["loss_action"], rel=1e-4)  # the drop mattered
    # whatever the logits at ignored positions are, the loss is the same: perturb the inputs
    # there ... only the last position, so no later position sees the change
    last = {k: v.clone() for k, v in masked.items()}
    last["action"][:, -1] = IGNORE
    changed = {k: v.clone() for k, v in last.items()}
    changed["state"][:, -1] = (changed["state"][:, -1] + 3) % envs.n_state_tokens(cfg)
    changed["prev_action"][:, -1] = (changed["prev_action"][:, -1] + 1) % envs.n_actions(cfg)
    if mode == "two_region":  # the last token is a marker there; its type target must go too
        last["next_kind"][:, -1] = IGNORE
        changed["next_kind"][:, -1] = IGNORE
        changed["kind"][:, -1] = KIND_STEP
    with torch.no_grad():
        la, ma = loss_and_metrics(model, last)
        lb, mb = loss_and_metrics(model, changed)
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    assert ma["loss_action"] == pytest.approx(mb["loss_action"], rel=1e-6)


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.7])
def test_token_type_loss_weight_is_applied(data, weight):
    cfgs, path = data
    cfg = dict(cfgs["two_region"], token_type_loss_weight=weight)
    torch.manual_seed(0)
    model = build_model(cfg, envs.model_inputs(cfg))
    assert model.config.token_type_loss_weight == weight
    batch = sample_batch(cfg, path)
    loss, metrics = loss_and_metrics(model, batch)
    assert loss.item() == pytest.approx(metrics["loss_action"] + weight * metrics["loss_token_type"], rel=1e-5)
    assert {"loss_action", "acc_action", "loss_token_type", "acc_token_type"} <= set(metrics)
    loss.backward()
    type_grad = model.type_head.weight.grad.abs().sum().item()
    if weight == 0.0:
        assert type_grad == 0.0
    else:
        assert type_grad > 0.0


def test_region_end_weight_weighs_the_region_end_targets(data):
    """The token-type loss is a weighted mean: region-end targets count region_end_weight
    times, every other target once."""
    cfgs, path = data
    batch = sample_batch(cfgs["two_region"], path)
    assert (batch["next_kind"] == KIND_END).any()
    losses = {}
    for w in (1.0, 10.0):
        cfg = dict(cfgs["two_region"], region_end_weight=w)
        torch.manual_seed(0)
        model = build_model(cfg, envs.model_inputs(cfg))
        _, type_logits = forward(model, batch)
        targets = batch["next_kind"].reshape(-1)
        valid = targets != -100
        per_token = F.cross_entropy(type_logits.reshape(-1, 3)[valid], targets[valid], reduction="none")
        weights = torch.where(targets[valid] == KIND_END, w, 1.0)
        with torch.no_grad():
            _, metrics = loss_and_metrics(model, batch)
        assert metrics["loss_token_type"] == pytest.approx(((per_token * weights).sum() / weights.sum()).item(), rel=1e-5)
        losses[w] = metrics["loss_token_type"]
    assert losses[1.0] != pytest.approx(losses[10.0])


def test_standard_mode_has_no_token_type_head_or_metrics(data):
    cfgs, path = data
    cfg = cfgs["standard"]
    model = build_model(cfg, envs.model_inputs(cfg))
    assert not hasattr(model, "type_head")
    _, metrics = loss_and_metrics(model, sample_batch(cfg, path))
    assert set(metrics) == {"loss_action", "acc_action"}


# ----------------------------------------------------------------------------- rotary positions

def test_rotate_attention_scores_depend_only_on_offsets():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 6, 8, generator=g), torch.randn(2, 3, 6, 8, generator=g)
    pos = torch.tensor([0, 1, 2, 5, 9, 10])
    scores = rotate(q, pos) @ rotate(k, pos).transpose(-1, -2)
    shifted = rotate(q, pos + 37) @ rotate(k, pos + 37).transpose(-1, -2)
    torch.testing.assert_close(shifted, scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rotate(q, pos).norm(dim=-1), q.norm(dim=-1))  # a rotation
    stretched = rotate(q, pos * 2) @ rotate(k, pos * 2).transpose(-1, -2)
    assert not torch.allclose(stretched, scores, atol=1e-3)
    # per-row positions (B, L) are the same as the shared ones
    torch.testing.assert_close(rotate(q, pos.expand(2, -1)), rotate(q, pos))


@pytest.mark.parametrize("mode", MODES)
def test_forward_is_invariant_to_a_constant_position_offset(data, mode):
    cfgs, path = data
    cfg = cfgs[mode]
    model = sensitive_model(cfg)
    batch = sample_batch(cfg, path)
    L = batch["kind"].shape[1]
    base_a, base_t = forward(model, batch)
    for offset in (1, 13, 250):
        a, ty = forward(model, batch, pos=torch.arange(L) + offset)
        torch.testing.assert_close(a, base_a, atol=2e-4, rtol=1e-4)
        if mode == "two_region":
            torch.testing.assert_close(ty, base_t, atol=2e-4, rtol=1e-4)
    # per-row offsets too
    B = batch["kind"].shape[0]
    rows = torch.arange(L)[None] + torch.tensor([[0], [7], [100]])[:B]
    a, _ = forward(model, batch, pos=rows)
    torch.testing.assert_close(a, base_a, atol=2e-4, rtol=1e-4)
    # ... while positions do matter (the check above is not vacuous)
    a, _ = forward(model, batch, pos=torch.arange(L) * 3)
    assert not torch.allclose(a, base_a, atol=1e-3)


def test_model_config_from_config(data):
    cfgs, _ = data
    c = ModelConfig.from_config(cfgs["two_region"], {"n_actions": 5, "state_cardinalities": [5, 5]})
    assert (c.n_embd, c.n_layer, c.n_head, c.two_region) == (16, 1, 2, True)
    assert (c.n_state_tokens, c.state_cardinalities, c.n_actions) == (25, (5, 5), 5)
    # the loss weights are the model config's, not attributes set after building
    assert (c.token_type_loss_weight, c.region_end_weight) == (cfgs["two_region"]["token_type_loss_weight"],
                                                                cfgs["two_region"]["region_end_weight"])
    assert {KIND_STEP, KIND_START, KIND_END} == {0, 1, 2}


def test_factored_state_embedding_sums_per_coordinate_vectors():
    """state_embedding=factored: the embedding of cell (x, y) is row x of the x block plus
    row y of the y block, so two cells that share a coordinate share that part."""
    from cli import load_config
    cfg = load_config([], {"grid_size": 5, "state_embedding": "factored"})
    model = build(cfg, envs.model_inputs(cfg))
    states = np.array([[1, 3], [4, 0], [1, 0]])
    index = torch.as_tensor(envs.state_token(cfg, states))
    got = model.embed_state(index)
    table = model.state_emb.weight
    want = torch.stack([table[x] + table[5 + y] for x, y in states])
    torch.testing.assert_close(got, want)
    cell_cfg = load_config([], {"grid_size": 5, "state_embedding": "cell"})
    cell = build(cell_cfg, envs.model_inputs(cell_cfg))
    assert cell.state_emb.weight.shape[0] == 25


@pytest.mark.parametrize("favoured, recall", [(KIND_END, 1.0), (KIND_STEP, 0.0)])
def test_region_end_recall_reports_whether_the_rare_end_class_is_predicted(data, favoured, recall):
    cfgs, path = data
    cfg = cfgs["two_region"]
    model = build_model(cfg, envs.model_inputs(cfg))
    with torch.no_grad():
        model.type_head.weight.zero_()
        model.type_head.bias.fill_(0.0)
        model.type_head.bias[favoured] = 10.0
        _, metrics = loss_and_metrics(model, sample_batch(cfg, path))
    assert metrics["recall_region_end"] == recall
    if favoured == KIND_STEP:  # the majority class alone already scores a high accuracy
        assert metrics["acc_token_type"] > 0.8
