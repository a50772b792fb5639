"""Shared plumbing: config files, user errors, seeding, devices, paths.

Configs are YAML files merged left to right (later wins); a file may `include:` another
(path relative to the including file). `--set key=value` overrides come last. The merged
dict is checked against `config/schema.py` and filled with defaults, so what a script
saves next to its output is the whole resolved config.
"""
import argparse
import difflib
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import yaml

from config.schema import COLLECTION_KEYS, SCHEMA


class UserError(Exception):
    """A problem with what the user asked for; scripts print it in one line and exit 2."""


class ConfigError(UserError):
    pass


# ----------------------------------------------------------------------------- configs

def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    path = Path(path)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(str(p) for p in seen)})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of key: value, got {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{path}: config keys must be names, got {bad_keys!r}")
    merged = {}
    include = data.pop("include", None)
    includes = [include] if isinstance(include, str) else (include or [])
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include must be a file path or a list of file paths, got {include!r}")
    for inc in includes:
        merged.update(_read_yaml(path.parent / inc, seen + (path.resolve(),)))
    merged.update(data)
    return merged


def parse_set(items: list[str]) -> dict:
    """`--set a=1 b=x` -> {'a': 1, 'b': 'x'}; values are parsed as YAML scalars."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set n_stream=4")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                              "quote it or fix it") from None
    return out


def _coerce(key: str, value, origin: str):
    spec = SCHEMA[key]
    allowed = spec.type.__name__
    bad = ConfigError(f"{key}={value!r} ({origin}): expected {allowed}" +
                      (f", one of {list(spec.choices)}" if spec.choices else ""))
    if spec.type is bool:
        if not isinstance(value, bool):
            raise bad
    elif spec.type is int:
        # YAML reads 1e5 as a string and 1.0e5 as a float; accept both when integral
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float):
            if not value.is_integer():
                raise bad
            value = int(value)
        if not isinstance(value, int):
            raise bad
    elif spec.type is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):  # YAML reads 3e-4 as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif spec.type is str:
        if isinstance(value, (bool, dict, list)) or value is None:
            raise bad
        value = str(value)
    if spec.choices and value not in spec.choices:
        raise bad
    if spec.min is not None and value < spec.min:
        raise ConfigError(f"{key}={value} ({origin}): must be >= {spec.min}")
    if spec.max is not None and value > spec.max:
        raise ConfigError(f"{key}={value} ({origin}): must be <= {spec.max}")
    return value


def _check_known(key: str, origin: str):
    if key not in SCHEMA:
        close = difflib.get_close_matches(key, SCHEMA, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for the list of keys"
        raise ConfigError(f"unknown config key '{key}' ({origin}){hint}")


def load_config(paths: list, overrides: dict | None = None) -> dict:
    """Merge config files and overrides, validate, fill defaults. Raises ConfigError."""
    cfg, origin = {}, {}
    for path in paths:
        for key, value in _read_yaml(Path(path)).items():
            _check_known(key, str(path))
            cfg[key], origin[key] = value, str(path)
    for key, value in (overrides or {}).items():
        _check_known(key, "--set")
        cfg[key], origin[key] = value, "--set"
    resolved = {}
    for key, spec in SCHEMA.items():
        resolved[key] = _coerce(key, cfg[key], origin[key]) if key in cfg else spec.default
    check_combinations(resolved)
    return resolved


def check_combinations(cfg: dict):
    """Combinations of individually valid values that cannot work together."""
    if cfg["model"] == "CompressedAD" and cfg["use_compressed_context"]:
        raise ConfigError("use_compressed_context=true is the two-region mode of model: AD; "
                          "CompressedAD compresses with its encoder instead: set one of them")
    if cfg["use_compressed_context"]:
        if cfg["n_transit"] < 2 * cfg["compress_interval"]:
            raise ConfigError(
                f"n_transit={cfg['n_transit']} is smaller than two regions "
                f"(2 x compress_interval = {2 * cfg['compress_interval']}); the two-region "
                f"context needs n_transit >= {2 * cfg['compress_interval']}")
        if cfg["compress_interval"] != cfg["n_steps"]:
            raise ConfigError(
                f"compress_interval={cfg['compress_interval']} differs from n_steps={cfg['n_steps']}: "
                "a region is one PPO rollout, so set compress_interval to the collection's n_steps")
    if cfg["tf_n_embd"] % cfg["tf_n_head"]:
        raise ConfigError(f"tf_n_embd={cfg['tf_n_embd']} must be divisible by tf_n_head={cfg['tf_n_head']}")
    if (cfg["tf_n_embd"] // cfg["tf_n_head"]) % 2:
        raise ConfigError(f"tf_n_embd / tf_n_head = {cfg['tf_n_embd'] // cfg['tf_n_head']} must be even "
                          "(rotary position embedding rotates pairs of channels)")
    if cfg["batch_size"] > cfg["n_steps"] * cfg["n_stream"]:
        raise ConfigError(f"batch_size={cfg['batch_size']} is larger than one rollout "
                          f"(n_steps x n_stream = {cfg['n_steps'] * cfg['n_stream']})")
    if cfg["n_steps"] * cfg["n_stream"] % cfg["batch_size"]:
        raise ConfigError(f"batch_size={cfg['batch_size']} must divide a rollout "
                          f"(n_steps x n_stream = {cfg['n_steps'] * cfg['n_stream']}) so every "
                          "minibatch has the same size")


def collection_config(cfg: dict) -> dict:
    return {k: cfg[k] for k in COLLECTION_KEYS}


def config_help() -> str:
    lines, section = [], None
    for key, spec in SCHEMA.items():
        if spec.section != section:
            section = spec.section
            lines.append(f"\n{section} keys:")
        choices = f" {{{','.join(spec.choices)}}}" if spec.choices else ""
        lines.append(f"  {key} ({spec.type.__name__}{choices}, default {spec.default!r}): {spec.help}")
    return "\n".join(lines)


def config_arg_parser(description: str, config_files_help: str = "YAML config files, merged left to right") \
        -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog="config keys (set in YAML files or with --set):" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help=config_files_help)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set n_stream=4 device=cpu")
    return parser


def save_config(cfg: dict, path: Path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- running

def run_cli(main):
    """Run a script's main(); user errors become one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is saved, rerun the same command to continue", file=sys.stderr)
        sys.exit(130)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    import torch
    torch.manual_seed(seed)


def pick_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use --set device=cpu or auto")
    return torch.device(name)


def dataset_path(cfg: dict) -> Path:
    return Path(cfg["dataset_dir"]) / f"history_{cfg['env']}_{cfg['alg']}_alg-seed{cfg['alg_seed']}.hdf5"


def run_name(cfg: dict) -> str:
    """{model}-{env}-seed{seed}; two-region AD is 'AD-tworegion' so it never resumes a plain AD run."""
    model = "AD-tworegion" if cfg["use_compressed_context"] else cfg["model"]
    return f"{model}-{cfg['env']}-seed{cfg['seed']}"


def run_path(cfg: dict) -> Path:
    return Path(cfg["run_dir"]) / run_name(cfg)
