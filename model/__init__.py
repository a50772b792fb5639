"""Model variants: one module each (model/ad.py: AD and two-region AD, model/compressed.py:
CompressedAD), each registering a `Variant` (model/variant.py) under its config name."""
import importlib
import pkgutil

from model.rollout import rows_per_encoding
from model.variant import VARIANTS, Variant, register, variant_of  # noqa: F401

# every module of model/ is imported, and each variant module registers itself: adding a
# variant is adding its module
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build(cfg: dict, inputs: dict):
    """The model of cfg's variant; `inputs` from env.model_inputs(cfg)."""
    return variant_of(cfg).build(cfg, inputs)


def memory_estimate(cfg: dict, inputs: dict, batch: int, training: bool) -> dict:
    """Rough peak memory in bytes, by part, of the model on `batch` sequences: its parameters
    (plus gradients and the two AdamW moments when training) and its activations (kept for
    the backward pass when training; the KV cache and one re-encoding in a rollout). The
    model is built on the meta device, so this allocates nothing. An estimate, used to
    refuse sizes that cannot fit before any work, not a promise."""
    import torch
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build(cfg, inputs).parameters())
    E, H = cfg["tf_n_embd"], cfg["tf_n_head"]
    runs = variant_of(cfg).transformer_runs(cfg, training)  # (layers, tokens) per sequence
    # per layer and token: ~16 E floats (qkv, attention output, MLP in and out, norms,
    # residual) and the H x tokens attention weights, float32
    act = sum(layers * tokens * (16 * E + 2 * H * tokens) * 4 for layers, tokens in runs)
    if training:
        return {"parameters, gradients and optimiser state": 16 * n_params, "activations": batch * act}
    layers, tokens = runs[0]
    kv_cache = 2 * layers * tokens * E * 4
    # a rollout re-encodes its context a chunk of rows at a time (model/rollout.py)
    encoding = min(batch, rows_per_encoding(H, tokens)) * act // layers
    return {"parameters": 4 * n_params, "KV cache": batch * kv_cache, "re-encoding": encoding}
