"""Config system: merging, include, --set, defaults, coercion and every error path."""
import subprocess
import sys
from pathlib import Path

import pytest
from cli_in_process import assert_one_line_error

from cli import load_config
from config.loading import parse_set, resolve_config
from config.schema import COLLECTION_KEYS, SCHEMA
from errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
ALG = ROOT / "config/algorithm/ppo_darkroom.yaml"
ENV = ROOT / "config/env/darkroom.yaml"



def assert_refused(proc, *words) -> str:
    """A subprocess's refusal (see cli_in_process.assert_one_line_error)."""
    return assert_one_line_error(proc.returncode, proc.stderr, *words, stdout=proc.stdout)

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def raises_naming(key_words, fn, *args, **kw):
    """fn raises ConfigError (a UserError) whose message names every word in key_words."""
    with pytest.raises(ConfigError) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert "\n" not in msg.strip(), msg
    for w in key_words:
        assert w in msg, (w, msg)
    return msg


# ----------------------------------------------------------------------------- shipped configs

def test_shipped_darkroom_configs_load():
    cfg = load_config([ALG, ENV])
    assert set(cfg) == set(SCHEMA)
    assert (cfg["env"], cfg["grid_size"], cfg["horizon"], cfg["train_env_ratio"]) == ("darkroom", 9, 20, 0.9)
    assert (cfg["alg"], cfg["n_steps"], cfg["batch_size"], cfg["alg_seed"]) == ("PPO", 80, 40, 42)
    assert cfg["total_source_timesteps"] == 100000 and cfg["n_stream"] == 100
    assert cfg["source_lr"] == pytest.approx(3e-4) and isinstance(cfg["source_lr"], float)
    assert set(COLLECTION_KEYS) <= set(SCHEMA)
    base = load_config([ROOT / "config/algorithm/ppo_base.yaml", ENV])
    assert base == cfg  # ppo_darkroom is the base settings: same dataset


def test_shipped_key_to_door_configs_load():
    cfg = load_config([ROOT / "config/algorithm/ppo_dark_key_to_door.yaml", ROOT / "config/env/dark_key_to_door_9x9_all.yaml"])
    assert (cfg["env"], cfg["horizon"]) == ("dark_key_to_door", 50)
    assert (cfg["n_steps"], cfg["batch_size"], cfg["total_source_timesteps"]) == (100, 50, 64000)
    assert cfg["n_epochs"] == 20  # from the included base file
    nine = load_config([ROOT / "config/algorithm/ppo_dark_key_to_door.yaml", ROOT / "config/env/dark_key_to_door_9x9_650.yaml"])
    assert (nine["grid_size"], nine["horizon"], nine["max_tasks"]) == (9, 50, 650)


# ----------------------------------------------------------------------------- merging

def test_later_file_wins_and_defaults_filled(tmp_path):
    a = write(tmp_path / "a.yaml", "n_stream: 4\nhorizon: 10\n")
    b = write(tmp_path / "b.yaml", "n_stream: 8\n")
    cfg = load_config([a, b])
    assert cfg["n_stream"] == 8 and cfg["horizon"] == 10
    assert load_config([b, a])["n_stream"] == 4
    # everything else is the schema default
    assert set(cfg) == set(SCHEMA)
    for key, spec in SCHEMA.items():
        if key not in ("n_stream", "horizon"):
            assert cfg[key] == spec.default, key


def test_no_files_gives_defaults():
    cfg = load_config([])
    assert cfg == {k: s.default for k, s in SCHEMA.items()}


def test_overrides_win_over_files(tmp_path):
    a = write(tmp_path / "a.yaml", "n_stream: 4\n")
    assert load_config([a], {"n_stream": 6})["n_stream"] == 6
    assert load_config([a], parse_set(["n_stream=7", "n_stream=9"]))["n_stream"] == 9


def test_empty_file_is_allowed(tmp_path):
    assert load_config([write(tmp_path / "e.yaml", "# nothing\n")]) == load_config([])


# ----------------------------------------------------------------------------- include

def test_include_is_relative_to_including_file(tmp_path, monkeypatch):
    write(tmp_path / "conf/base.yaml", "n_stream: 3\nhorizon: 11\n")
    child = write(tmp_path / "conf/sub/child.yaml", "include: ../base.yaml\nhorizon: 12\n")
    write(tmp_path / "base.yaml", "n_stream: 99\n")  # a decoy next to the cwd
    monkeypatch.chdir(tmp_path)
    cfg = load_config([child])
    assert cfg["n_stream"] == 3      # from the included file (not the decoy in the cwd)
    assert cfg["horizon"] == 12      # the including file wins over what it includes


def test_include_list_later_wins_and_nested(tmp_path):
    write(tmp_path / "a.yaml", "n_stream: 1\nhorizon: 5\ngrid_size: 5\n")
    write(tmp_path / "b.yaml", "include: a.yaml\nn_stream: 2\n")
    write(tmp_path / "c.yaml", "n_stream: 3\nhorizon: 6\n")
    top = write(tmp_path / "top.yaml", "include: [b.yaml, c.yaml]\nhorizon: 7\n")
    cfg = load_config([top])
    assert (cfg["n_stream"], cfg["horizon"], cfg["grid_size"]) == (3, 7, 5)
    assert "include" not in cfg


def test_include_missing_file(tmp_path):
    top = write(tmp_path / "top.yaml", "include: nothere.yaml\n")
    raises_naming(["nothere.yaml"], load_config, [top])


@pytest.mark.parametrize("files", [
    {"a.yaml": "include: a.yaml\n"},
    {"a.yaml": "include: b.yaml\n", "b.yaml": "include: a.yaml\n"},
    {"a.yaml": "include: b.yaml\n", "b.yaml": "include: c.yaml\n", "c.yaml": "include: sub/../a.yaml\n"},
])
def test_include_cycle_rejected(tmp_path, files):
    (tmp_path / "sub").mkdir()
    for name, text in files.items():
        write(tmp_path / name, text)
    msg = raises_naming(["a.yaml"], load_config, [tmp_path / "a.yaml"])
    assert "cycle" in msg


def test_same_file_included_twice_is_not_a_cycle(tmp_path):
    write(tmp_path / "base.yaml", "n_stream: 2\n")
    write(tmp_path / "x.yaml", "include: base.yaml\n")
    top = write(tmp_path / "top.yaml", "include: [base.yaml, x.yaml]\n")
    assert load_config([top])["n_stream"] == 2


# ----------------------------------------------------------------------------- --set

def test_parse_set_yaml_scalars():
    out = parse_set(["a=1", "b=x", "c=3e-4", "d=true", "e=", "f=a=b", " g =0.5", "h=null", "i='007'"])
    assert out == {"a": 1, "b": "x", "c": "3e-4", "d": True, "e": "", "f": "a=b", "g": 0.5, "h": None,
                   "i": "007"}
    assert type(out["a"]) is int and type(out["d"]) is bool
    assert parse_set([]) == {} and parse_set(None) == {}


def test_parse_set_requires_key_value():
    raises_naming(["n_stream", "key=value"], parse_set, ["n_stream"])


@pytest.mark.parametrize("item", ["n_stream=[1", "device=@x", "env={"])
def test_parse_set_malformed_yaml_value_is_a_config_error(item):
    raises_naming([item.split("=")[0]], parse_set, [item])


def test_set_values_are_coerced():
    cfg = load_config([], parse_set(["total_source_timesteps=1e5", "source_lr=3e-4", "gamma=1",
                                     "use_compressed_context=false", "eval_tasks=3", "n_stream=8"]))
    assert cfg["total_source_timesteps"] == 100000 and type(cfg["total_source_timesteps"]) is int
    assert cfg["source_lr"] == pytest.approx(3e-4) and type(cfg["source_lr"]) is float
    assert cfg["gamma"] == 1.0 and type(cfg["gamma"]) is float
    assert cfg["use_compressed_context"] is False
    assert cfg["eval_tasks"] == "3"
    assert cfg["n_stream"] == 8


# ----------------------------------------------------------------------------- coercion

@pytest.mark.parametrize("text,key,want", [
    ("total_source_timesteps: 1e5", "total_source_timesteps", 100000),
    ("total_source_timesteps: 1.0e5", "total_source_timesteps", 100000),
    ("total_source_timesteps: 2.5e3", "total_source_timesteps", 2500),
    ("n_stream: 4.0", "n_stream", 4),
    ("source_lr: 3e-4", "source_lr", 3e-4),
    ("source_lr: 3.0e-4", "source_lr", 3e-4),
    ("source_lr: 1", "source_lr", 1.0),
    ("lr: '1e-3'", "lr", 1e-3),
])
def test_numeric_coercion(tmp_path, text, key, want):
    cfg = load_config([write(tmp_path / "c.yaml", text + "\n")])
    assert cfg[key] == pytest.approx(want)
    assert type(cfg[key]) is SCHEMA[key].type


# ----------------------------------------------------------------------------- error paths

def test_unknown_key_suggests_close_match(tmp_path):
    msg = raises_naming(["n_streams", "n_stream"], load_config, [write(tmp_path / "c.yaml", "n_streams: 4\n")])
    assert "did you mean" in msg and str(tmp_path / "c.yaml") in msg
    msg = raises_naming(["horizn", "horizon", "--set"], load_config, [], {"horizn": 3})
    assert "did you mean" in msg


def test_unknown_key_without_close_match(tmp_path):
    msg = raises_naming(["bogus_key"], load_config, [], {"bogus_key": 1})
    assert "did you mean" not in msg


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


@pytest.mark.parametrize("key,value,also", [
    ("n_stream", "abc", ["int"]),
    ("n_stream", 2.5, ["int"]),
    ("n_stream", True, ["int"]),
    ("n_stream", None, ["int"]),
    ("n_stream", [1, 2], ["int"]),
    ("horizon", "", ["int"]),
    ("source_lr", "fast", ["float"]),
    ("source_lr", True, ["float"]),
    ("use_compressed_context", 1, ["bool"]),
    ("use_compressed_context", "yes please", ["bool"]),
    ("eval_greedy", "true", ["bool"]),   # a quoted string is not a bool
    ("env", 5, ["darkroom"]),
    ("dataset_dir", None, ["str"]),
    ("dataset_dir", {"a": 1}, ["str"]),
])
def test_wrong_type_names_key(key, value, also):
    raises_naming([key] + also, load_config, [], {key: value})


@pytest.mark.parametrize("key,value,bound", [
    ("grid_size", 1, ">= 2"), ("grid_size", 65, "<= 64"), ("horizon", 0, ">= 1"),
    ("train_env_ratio", 1.5, "<= 1"), ("train_env_ratio", -0.1, ">= 0"), ("gamma", -0.01, ">= 0"),
    ("n_stream", 0, ">= 1"), ("source_lr", -1e-3, ">= 0"), ("test_stream_ratio", 0.6, "<= 0.5"),
])
def test_out_of_range_names_key_and_bound(key, value, bound):
    raises_naming([key, bound], load_config, [], {key: value})


@pytest.mark.parametrize("key", ["gamma", "source_lr", "train_env_ratio"])
def test_nan_is_rejected(key):
    raises_naming([key], load_config, [], parse_set([f"{key}=.nan"]))


def test_range_bounds_are_inclusive():
    cfg = load_config([], {"grid_size": 2, "train_env_ratio": 0.5, "gamma": 0.0, "test_stream_ratio": 0.5})
    assert (cfg["grid_size"], cfg["gamma"], cfg["test_stream_ratio"]) == (2, 0.0, 0.5)
    # train_env_ratio=1.0 is in range; the split check then refuses it (no held-out task)
    raises_naming(["train_env_ratio=1.0", "no held-out test task"], load_config, [], {"train_env_ratio": 1.0})


@pytest.mark.parametrize("key,value", [("env", "darkroom2"), ("alg", "SAC"), ("backend", "torch"),
                                       ("model", "DT"), ("device", "tpu"), ("eval_split", "validation"),
                                       ("eval_markers", "never")])
def test_bad_choice_names_key_and_choices(key, value):
    raises_naming([key, value] + list(SCHEMA[key].allowed()), load_config, [], {key: value})


def _compressed(**kw):
    base = {"use_compressed_context": True, "n_steps": 80, "compress_interval": 80, "n_transit": 160}
    base.update(kw)
    return base


def test_two_region_context_limits():
    assert load_config([], _compressed())["n_transit"] == 160  # exactly two regions is enough
    msg = raises_naming(["n_transit", "compress_interval"], load_config, [], _compressed(n_transit=159))
    assert "160" in msg
    # without the two-region mode a short window is fine
    assert load_config([], {"n_transit": 20})["n_transit"] == 20


def test_learners_per_task_must_divide_n_stream_and_fit_the_backend():
    raises_naming(["learners_per_task=3", "n_stream=8"], load_config, [],
                  {"n_stream": 8, "learners_per_task": 3, "batch_size": 16, "n_steps": 16})
    raises_naming(["learners_per_task=2", "backend=batched"], load_config, [],
                  {"n_stream": 4, "learners_per_task": 2, "backend": "sb3", "batch_size": 16, "n_steps": 16})
    # a learner's rollout is n_steps x its own streams: its minibatches must tile it
    raises_naming(["batch_size=32", "learners_per_task", "16"], load_config, [],
                  {"n_stream": 4, "learners_per_task": 4, "batch_size": 32, "n_steps": 16})
    assert load_config([], {"n_stream": 4, "learners_per_task": 4, "batch_size": 16, "n_steps": 16})


def test_count_bonus_is_a_batched_ppo_key_of_the_data():
    """count_bonus names PPO data; other sources, the sb3 backend and continuous states refuse it."""
    from config.loading import collection_config
    k2d = ROOT / "config/env/dark_key_to_door_5x5.yaml"
    q = ROOT / "config/algorithm/q_learning_dark_key_to_door.yaml"
    raises_naming(["count_bonus=0.3", "alg=PPO"], load_config, [q, k2d], {"count_bonus": 0.3})
    assert "count_bonus" not in collection_config(load_config([q, k2d]))
    ppo = load_config([ROOT / "config/algorithm/ppo_dark_key_to_door.yaml", k2d], {"count_bonus": 0.3})
    assert collection_config(ppo)["count_bonus"] == 0.3
    raises_naming(["count_bonus=0.3", "backend=batched"], load_config, [], {"count_bonus": 0.3, "backend": "sb3"})
    raises_naming(["count_bonus=0.3", "point_robot"], load_config,
                  [ROOT / "config/algorithm/ppo_point_robot.yaml", ROOT / "config/env/point_robot.yaml"],
                  {"count_bonus": 0.3})
    raises_naming(["count_bonus"], load_config, [], {"count_bonus": -1.0})


def test_compress_interval_must_equal_n_steps():
    raises_naming(["compress_interval", "n_steps"], load_config, [],
                  _compressed(compress_interval=40, n_transit=400))
    # only checked in the two-region mode
    assert load_config([], {"compress_interval": 40})["compress_interval"] == 40


def test_compressed_ad_with_two_region_mode_rejected():
    raises_naming(["use_compressed_context", "CompressedAD"], load_config, [], _compressed(model="CompressedAD"))


def test_tf_n_embd_divisible_by_heads():
    raises_naming(["tf_n_embd", "tf_n_head"], load_config, [], {"tf_n_embd": 66, "tf_n_head": 4})
    assert load_config([], {"tf_n_embd": 96, "tf_n_head": 3})["tf_n_head"] == 3


def test_batch_size_must_divide_rollout():
    msg = raises_naming(["batch_size", "n_steps", "n_stream"], load_config, [],
                        {"batch_size": 30, "n_steps": 80, "n_stream": 4})
    assert "320" in msg
    raises_naming(["batch_size"], load_config, [], {"batch_size": 640, "n_steps": 80, "n_stream": 4})
    assert load_config([], {"batch_size": 320, "n_steps": 80, "n_stream": 4})["batch_size"] == 320


def test_missing_file():
    raises_naming(["/nonexistent/dir/x.yaml", "not found"], load_config, ["/nonexistent/dir/x.yaml"])


def test_invalid_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path / "bad.yaml", "n_stream: 4\nhorizon: [1, 2\n")
    msg = raises_naming([str(p)], load_config, [p])
    assert "YAML" in msg and "line" in msg


@pytest.mark.parametrize("text", ["- n_stream\n- 4\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path, text):
    p = write(tmp_path / "list.yaml", text)
    msg = raises_naming([str(p)], load_config, [p])
    assert "mapping" in msg


def test_errors_report_where_the_value_came_from(tmp_path):
    p = write(tmp_path / "a.yaml", "n_stream: many\n")
    raises_naming(["n_stream", str(p)], load_config, [p])
    raises_naming(["n_stream", "--set"], load_config, [p], {"n_stream": "lots"})


@pytest.mark.parametrize("text", ["1: 2\n", "include: 5\n", "include: [5]\n"])
def test_malformed_keys_are_config_errors(tmp_path, text):
    p = write(tmp_path / "odd.yaml", text)
    raises_naming([str(p)], load_config, [p])


# ----------------------------------------------------------------------------- script level

def run_collect(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "collect.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd or ROOT)



def test_script_unknown_key_exits_2(tmp_path):
    proc = run_collect(ALG, ENV, "--set", "bogus_key=1", f"dataset_dir={tmp_path}")
    assert_refused(proc, "bogus_key")
    assert not any(tmp_path.iterdir())  # stopped before any work


def test_script_wrong_type_exits_2(tmp_path):
    proc = run_collect(ALG, ENV, "--set", "n_stream=abc", f"dataset_dir={tmp_path}")
    assert_refused(proc, "n_stream", "int")
    assert not any(tmp_path.iterdir())


def test_script_bad_file_and_combination_exit_2(tmp_path):
    bad = write(tmp_path / "bad.yaml", "n_stream: [\n")
    assert_refused(run_collect(ALG, bad), str(bad))
    assert_refused(run_collect(ALG, ENV, "--set", "batch_size=33", f"dataset_dir={tmp_path}"),
                          "batch_size")


def test_script_help_lists_config_keys():
    proc = run_collect("--help")
    assert proc.returncode == 0, proc.stderr
    for key in SCHEMA:
        assert f"  {key} (" in proc.stdout, key
    assert "--set" in proc.stdout and "--tasks" in proc.stdout and "--merge" in proc.stdout


def test_every_model_config_opens_with_its_variant_and_environment():
    names = {"AD": "AD", "two-region AD": "AD", "CompressedAD": "CompressedAD", "SummaryAD": "SummaryAD"}
    for path in sorted((ROOT / "config/model").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        variant = next((v for v in sorted(names, key=len, reverse=True) if first.startswith(f"# {v} on ")), None)
        assert variant, f"{path.name}: the first line names no variant: {first!r}"
        text = resolve_config([path])  # the model keys alone, defaults elsewhere (no data to match)
        assert text["model"] == names[variant], path.name
        assert text["use_compressed_context"] == (variant == "two-region AD"), path.name
