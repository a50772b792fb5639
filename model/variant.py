"""What a model variant declares, and the registry the generic scripts look variants up in.

A variant is one module under model/ that subclasses `Variant` and calls `register` with an
instance; train.py, evaluate.py, scripts/ and bench/ only ever call the methods below, so
adding a variant touches no other file (docs/extending.md; tests/test_extending.py adds
one from a test file). The config's `model` key names the variant.
"""
from config.schema import VARIANTS
from errors import ConfigError


class Variant:
    """One model variant: how to build it, feed it in training and keep its memory in a rollout.

    The model it builds follows nanoGPT's shape: `model(tokens, targets=None) -> (logits,
    loss)` with `logits` a dict {target name: tensor} and `loss` None without targets, and
    `model.metrics(tokens, logits, targets) -> {name: float}` for the TensorBoard train/ and
    test/ scalars (`loss_action` and `acc_action` at least)."""
    name = ""  # the config's `model` value
    # DDP: True when some training step leaves parameters without a gradient (DDP must then
    # search the graph for them every step, which costs time, so only variants that need it)
    find_unused_parameters = False

    def check_config(self, cfg: dict):
        """Raise ConfigError (naming the keys and what is allowed) for impossible combinations."""

    def accepts_vector_states(self, cfg: dict) -> bool:
        """Whether this variant's tokens can carry a continuous state (a float vector per step,
        a family with a Box observation space); the config loader refuses the pair otherwise."""
        return True

    def run_prefix(self, cfg: dict) -> str:
        """First part of the run directory name, runs/{prefix}-{env}-seed{seed}."""
        return self.name

    def build(self, cfg: dict, inputs: dict):
        """The model (an nn.Module). `inputs` is what the environment family gives the model to
        embed (env.model_inputs): n_actions and state_cardinalities (discrete) or state_dim."""
        raise NotImplementedError

    def dataset(self, path, cfg: dict, part: str):
        """Samples of a history file: `part` 'train', 'test' (the training tasks' held-out streams)
        or 'val' (the validation tasks' streams: held-out losses for data of one stream per task)."""
        raise NotImplementedError

    def batches(self, dataset, batch_size: int, seed: int, rank: int, world: int, start: int, stop: int):
        """Dataset indices of optimiser steps start..stop (a DataLoader batch_sampler): a pure
        function of (seed, rank, step), so a resumed run draws the batches an uninterrupted one would."""
        raise NotImplementedError

    def collate(self, items: list) -> tuple[dict, dict]:
        """Samples -> (tokens, targets) tensors for model(tokens, targets)."""
        raise NotImplementedError

    def policy(self, model, cfg: dict, batch: int, device, use_cache: bool, memory: str, perm):
        """The rollout memory of `batch` rollouts: (context, policy). The context has
        `.max_tokens` (the most tokens the model attended to); the policy has
        `.step(token) -> action logits (batch, n_actions)` and `.start_episode() -> bool`
        (True when the memory ablation `memory` wiped what came before; `perm` gives each row
        a row of another task, for 'shuffle'), optionally `.stats() -> dict` for the summary."""
        raise NotImplementedError

    def transformer_runs(self, cfg: dict, training: bool) -> list[tuple[int, int]]:
        """(layers, tokens) the transformers run over per sequence, the decoder first: for the
        memory estimate that refuses sizes that cannot fit (model.memory_estimate)."""
        return [(cfg["tf_n_layer"], cfg["n_transit"])]

    def budget_overrides(self, n_transit: int, steps_in_stream: int) -> list[str]:
        """--set items besides n_transit when trained at a context budget (the memory study)."""
        return []

    def unused_keys(self, cfg: dict) -> tuple:
        """Config keys this variant's training does not read: resuming ignores them."""
        return ()

    def memory_state_bytes(self, cfg: dict) -> int:
        """Rollout memory beyond the KV cache of its tokens, per rollout (the memory study)."""
        return 0


def register(variant: Variant) -> Variant:
    """Make `variant` available as `model: <variant.name>` in configs."""
    VARIANTS[variant.name] = variant
    return variant


def variant_of(cfg: dict) -> Variant:
    try:
        return VARIANTS[cfg["model"]]
    except KeyError:
        raise ConfigError(f"model={cfg['model']!r} is not a model variant; one of {sorted(VARIANTS)}") from None
