"""What every command shares: its argument parser, the config loader with every check that
needs the registered environment families and model variants, the one way a command ends
on a user error (one line, exit code 2), and where runs go.

This is the top of the import layers (errors -> config -> env -> data -> model -> commands):
importing it registers every family and variant, so their keys and names are known.
"""
import argparse
import signal
import sys
from pathlib import Path

import env
import model
from config.loading import config_help, resolve_config
from errors import ConfigError, UserError, first_line


def load_config(paths: list, overrides: dict | None = None) -> dict:
    """Merge config files and overrides, validate every value and combination, fill defaults.
    Raises ConfigError naming the key and what is allowed."""
    cfg = resolve_config(paths, overrides)
    check_combinations(cfg)
    return cfg


def check_combinations(cfg: dict):
    """Combinations of individually valid values that cannot work together."""
    variant = model.variant_of(cfg)
    variant.check_config(cfg)
    env.family(cfg).check_config(cfg)
    if env.state_cardinalities(cfg) is None and not variant.accepts_vector_states(cfg):
        what = "model=AD with use_compressed_context=true" if cfg["use_compressed_context"] else f"model={cfg['model']}"
        raise ConfigError(f"{what} builds tokens with one number per state, and env={cfg['env']} has a continuous "
                          "(Box) state; use model=AD with use_compressed_context=false")
    if cfg["tf_n_embd"] % cfg["tf_n_head"]:
        raise ConfigError(f"tf_n_embd={cfg['tf_n_embd']} must be divisible by tf_n_head={cfg['tf_n_head']}")
    if (cfg["tf_n_embd"] // cfg["tf_n_head"]) % 2:
        raise ConfigError(f"tf_n_embd / tf_n_head = {cfg['tf_n_embd'] // cfg['tf_n_head']} must be even "
                          "(rotary position embedding rotates pairs of channels)")
    check_learners(cfg)
    check_split(cfg)


def check_learners(cfg: dict):
    """A PPO learner's rollout is n_steps x its streams; its minibatches must tile it."""
    learners = cfg["learners_per_task"]
    if cfg["n_stream"] % learners:
        raise ConfigError(f"learners_per_task={learners} must divide n_stream={cfg['n_stream']} "
                          "(each learner gets the same number of streams)")
    if learners > 1 and cfg["backend"] != "batched":
        raise ConfigError(f"learners_per_task={learners} needs backend=batched (the sb3 backend trains one "
                          "learner per task); set backend=batched or learners_per_task=1")
    streams = cfg["n_stream"] // learners
    rollout = (f"n_steps x n_stream = {cfg['n_steps'] * streams}" if learners == 1 else
               f"n_steps x n_stream / learners_per_task = {cfg['n_steps'] * streams}")
    if cfg["batch_size"] > cfg["n_steps"] * streams:
        raise ConfigError(f"batch_size={cfg['batch_size']} is larger than one rollout ({rollout})")
    if cfg["n_steps"] * streams % cfg["batch_size"]:
        raise ConfigError(f"batch_size={cfg['batch_size']} must divide a rollout ({rollout}) so every "
                          "minibatch has the same size")


def check_split(cfg: dict):
    """Training needs a training task and evaluation a held-out one; a ratio of 0 or 1, or a
    tiny grid, can leave a part empty, which would fail (or average to NaN) much later."""
    split = env.task_split(cfg)
    setting = (f"train_env_ratio={cfg['train_env_ratio']}, val_env_ratio={cfg['val_env_ratio']} with "
               f"{len(split)} tasks (grid_size={cfg['grid_size']})")
    if "train" not in split:
        raise ConfigError(f"{setting} leaves no training task; raise train_env_ratio or lower val_env_ratio")
    if "test" not in split:
        raise ConfigError(f"{setting} leaves no held-out test task; lower train_env_ratio")


def config_arg_parser(description: str, config_files_help: str = "YAML config files, merged left to right") \
        -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog="config keys (set in YAML files or with --set):" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help=config_files_help)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set n_stream=4 device=cpu")
    return parser


def _terminated(signum, frame):
    raise KeyboardInterrupt  # `kill` stops as cleanly as Ctrl-C: locks released, workers stopped


def run_cli(main):
    """Run a script's main(); user errors become one line on stderr and exit code 2."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the disk or the system failed (full disk, I/O error); writes are atomic
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or first_line(e)}{where}; finished work is saved, fix the cause and "
              "rerun the same command", file=sys.stderr)
        sys.exit(2)
    except MemoryError:
        print("error: out of memory; finished work is saved, rerun with smaller sizes", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is saved, rerun the same command to continue", file=sys.stderr)
        sys.exit(130)


def run_name(cfg: dict) -> str:
    """{prefix}-{env}-seed{seed}: the prefix is the variant's (two-region AD: 'AD-tworegion')."""
    return f"{model.variant_of(cfg).run_prefix(cfg)}-{cfg['env']}-seed{cfg['seed']}"


def run_path(cfg: dict) -> Path:
    return Path(cfg["run_dir"]) / run_name(cfg)
