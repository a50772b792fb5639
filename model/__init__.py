"""Model variants; `build` picks one from the config."""


def build(cfg: dict, n_state_tokens: int, n_actions: int):
    if cfg["model"] == "CompressedAD":
        from model.compressed import build_compressed_model
        return build_compressed_model(cfg, n_state_tokens, n_actions)
    from model.ad import build_model
    return build_model(cfg, n_state_tokens, n_actions)


def memory_estimate(cfg: dict, n_state_tokens: int, n_actions: int, batch: int, training: bool) -> dict:
    """Rough peak memory in bytes, by part, of the model on `batch` sequences: its parameters
    (plus gradients and the two AdamW moments when training) and its activations (kept for
    the backward pass when training; the KV cache and one re-encoding in a rollout). The
    model is built on the meta device, so this allocates nothing. An estimate, used to
    refuse sizes that cannot fit before any work, not a promise."""
    import torch
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build(cfg, n_state_tokens, n_actions).parameters())
    E, H = cfg["tf_n_embd"], cfg["tf_n_head"]
    # (layers, tokens) the transformers run over per sequence: the decoder sees the step
    # tokens (+ 4 two-region markers, + the latents); in training CompressedAD's encoder
    # keeps activations for the grad_compression_rounds stages gradients flow through, each
    # a stage of up to n_transit // 2 steps between the latents in and the latent queries
    runs = [(cfg["tf_n_layer"], cfg["n_transit"] + 4)]
    if cfg["model"] == "CompressedAD":
        runs = [(cfg["tf_n_layer"], cfg["n_transit"] + cfg["n_latent"])]
        if training:
            rounds = min(cfg["grad_compression_rounds"], cfg["max_compression_depth"])
            runs.append((cfg["enc_n_layer"] * rounds, cfg["n_transit"] // 2 + 2 * cfg["n_latent"]))
    # per layer and token: ~16 E floats (qkv, attention output, MLP in and out, norms,
    # residual) and the H x tokens attention weights, float32
    act = sum(layers * tokens * (16 * E + 2 * H * tokens) * 4 for layers, tokens in runs)
    if training:
        return {"parameters, gradients and optimiser state": 16 * n_params, "activations": batch * act}
    layers, tokens = runs[0]
    kv_cache = 2 * layers * tokens * E * 4
    # a rollout re-encodes its context a chunk of rows at a time (model/rollout.py)
    from model.rollout import rows_per_encoding
    encoding = min(batch, rows_per_encoding(H, tokens)) * act // layers
    return {"parameters": 4 * n_params, "KV cache": batch * kv_cache, "re-encoding": encoding}
