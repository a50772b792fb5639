"""Reading configs: YAML files merged left to right (later wins), `include:` of other files
(paths relative to the including file), `--set key=value` overrides last, every value checked
against `config/schema.py` (known key, type, range) and the defaults filled in, so what a
command saves beside its output is the whole resolved config.

Checks that need an environment family or a model variant (they name keys of both) run on
top of this, in `cli.load_config`.
"""
import difflib
import math
from pathlib import Path

import yaml

from config.schema import COLLECTION_KEYS, SCHEMA, applies
from errors import ConfigError, UserError, first_line
from files import atomic_write, read_text


class DuplicateKeyError(yaml.YAMLError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a key given twice in one mapping is an error: yaml keeps
    the last value silently, so a forgotten earlier line would change a run unseen."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(f"'{key}' is set twice (line {seen[key]} and line {line})"
                                            "; keep one of them")
                seen[key] = line
            except TypeError:  # an unhashable key: the base class names the problem
                continue
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: Path, what: str = "config file") -> dict:
    """A YAML file holding a mapping of names to values (empty file: {}), or a ConfigError."""
    text = read_text(path, what)
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', None) or first_line(e)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of key: value, got {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{path}: config keys must be names, got {bad_keys!r}")
    return data


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    path = Path(path)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(str(p) for p in seen)})")
    try:
        data = read_yaml_mapping(path)
    except UserError as e:  # every config problem is a ConfigError
        raise ConfigError(str(e)) from None
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


def _non_finite(value) -> bool:
    """Whether a value read from YAML is an infinity or a NaN (.inf, -.inf, .nan, or 'inf' as text)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and not math.isfinite(value)


def _coerce(key: str, value, origin: str):
    spec = SCHEMA[key]
    allowed = spec.type.__name__
    if spec.type in (int, float) and _non_finite(value):  # .inf, .nan: no setting means an endless or NaN value
        raise ConfigError(f"{key}={value!r} ({origin}): infinite and NaN values (.inf, .nan) are not allowed; "
                          f"give a finite {allowed}"
                          + (f" between {spec.min} and {spec.max}" if spec.min is not None and spec.max is not None
                             else ""))
    bad = ConfigError(f"{key}={value!r} ({origin}): expected {allowed}" +
                      (f", one of {list(spec.allowed())}" if spec.allowed() else ""))
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
    if spec.allowed() and value not in spec.allowed():
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


def resolve_config(paths: list, overrides: dict | None = None) -> dict:
    """Merge config files and overrides, check each value, fill defaults. Raises ConfigError."""
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
    return resolved


def collection_keys(cfg: dict) -> list[str]:
    """The keys that define cfg's data: the common ones and its family's own (not another family's)."""
    return [k for k in COLLECTION_KEYS if applies(k, cfg)]


def collection_config(cfg: dict) -> dict:
    return {k: cfg[k] for k in collection_keys(cfg)}


def config_help() -> str:
    """Every key with its type, choices, default and help, by section (the commands' --help)."""
    lines, section = [], None
    sections = list(dict.fromkeys(spec.section for spec in SCHEMA.values()))
    for key, spec in sorted(SCHEMA.items(), key=lambda item: sections.index(item[1].section)):  # stable
        if spec.section != section:
            section = spec.section
            lines.append(f"\n{section} keys:")
        choices = f" {{{','.join(spec.allowed())}}}" if spec.allowed() else ""
        lines.append(f"  {key} ({spec.type.__name__}{choices}, default {spec.default!r}): {spec.help}")
    return "\n".join(lines)


def save_config(cfg: dict, path: Path):
    with atomic_write(path, "w") as f:
        f.write(yaml.safe_dump(cfg, sort_keys=False))
