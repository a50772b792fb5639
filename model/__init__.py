"""Model variants; `build` picks one from the config."""


def build(cfg: dict, n_state_tokens: int, n_actions: int):
    if cfg["model"] == "CompressedAD":
        from model.compressed import build_compressed_model
        return build_compressed_model(cfg, n_state_tokens, n_actions)
    from model.ad import build_model
    return build_model(cfg, n_state_tokens, n_actions)
