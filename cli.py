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
from algorithm.history import n_rollouts, steps_per_stream
from config.loading import config_help, resolve_config
from config.schema import SCHEMA, SOURCE_KEYS
from dataset import region_gap
from errors import ConfigError, UserError, disk_full, first_line


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
    env.family(cfg).check(cfg)
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
    check_memory_ablation(cfg)


def check_source_keys(cfg: dict):
    """A key of one source set for another is refused, naming the source it belongs to: it would
    be ignored, and a key that names the data must keep its default so one dataset never has two
    names. PPO's minibatch and optimiser keys are the exception: the other sources' configs
    include a PPO config for its env settings, and those keys are no part of their data. No such
    config sets learners_per_task or count_bonus, so those are refused like any other source's key."""
    for key, sources in SOURCE_KEYS.items():
        ppo_setting = sources == ("PPO",) and key not in ("learners_per_task", "count_bonus")
        if cfg["alg"] in sources or ppo_setting or cfg[key] == SCHEMA[key].default:
            continue
        raise ConfigError(f"{key}={cfg[key]!r} applies to alg={' or alg='.join(sources)} only (alg={cfg['alg']} "
                          f"does not read it): drop it or leave it at {SCHEMA[key].default!r}")


def check_learners(cfg: dict):
    """A PPO learner's rollout is n_steps x its streams; its minibatches must tile it. A
    source other than PPO (alg QLearning, PosteriorSampling, NoisyExpert) has no PPO minibatches
    (check_source_keys)."""
    check_source_keys(cfg)
    learners = cfg["learners_per_task"]
    if cfg["alg"] != "PPO":
        return
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
    check_count_bonus(cfg)


def check_count_bonus(cfg: dict):
    """The count bonus counts discrete observations, in the batched backend only."""
    bonus = cfg["count_bonus"]
    if not bonus:
        return
    if cfg["backend"] != "batched":
        raise ConfigError(f"count_bonus={bonus} needs backend=batched (the sb3 backend learns from the env's "
                          "reward only); set backend=batched or count_bonus=0")
    if env.state_cardinalities(cfg) is None:
        raise ConfigError(f"count_bonus={bonus} counts visits to discrete observations, and env={cfg['env']} "
                          "has a continuous (Box) state; set count_bonus=0")


def check_split(cfg: dict):
    """Training needs a training task and evaluation a held-out one; a ratio of 0 or 1, or a
    short task list, can leave a part empty, which would fail (or average to NaN) much later.
    The message names what to change: train_env_ratio where some value works for this many
    tasks, else what makes the task list longer (or val_env_ratio, which takes training tasks)."""
    split = env.task_split(cfg)
    if "train" in split and "test" in split:
        return
    n, family = len(split), env.family(cfg)
    n_val = round(cfg["val_env_ratio"] * n)
    # k tasks not held out (train_env_ratio = k / n): k - n_val train on, n - k are held out
    works = [k for k in range(1, n) if k - min(n_val, k) >= 1]
    setting = f"train_env_ratio={cfg['train_env_ratio']}, val_env_ratio={cfg['val_env_ratio']} with {n} tasks"
    if works:
        lo, hi = works[0] / n, works[-1] / n
        what = "no training task" if "train" not in split else "no held-out test task"
        fix = "raise train_env_ratio" if "train" not in split else "lower train_env_ratio"
        raise ConfigError(f"{setting} leaves {what}; {fix} (between {lo:.2f} and {hi:.2f} works)"
                          + ("" if "train" in split or not cfg["val_env_ratio"] else " or lower val_env_ratio"))
    limited = cfg["max_tasks"] and n == cfg["max_tasks"] and (family.n_tasks(cfg) or n + 1) > n
    sizes = ("max_tasks",) if limited else family.size_keys
    now = ", ".join(f"{k}={cfg[k]}" for k in sizes)
    raise ConfigError(f"env={cfg['env']}{' with ' + now if now else ''} gives {n} task(s): too few for a training "
                      f"task and a held-out test task{' besides the validation ones' if n_val else ''} at any "
                      f"train_env_ratio; raise {' or '.join(sizes) or 'the number of tasks'}"
                      + (" or lower val_env_ratio" if n_val else ""))


def check_memory_ablation(cfg: dict):
    """eval_memory=shuffle gives each rollout the memory of a rollout on another task: with one
    task to evaluate there is none, and the 'ablation' would be the unablated run."""
    if cfg["eval_memory"] != "shuffle":
        return
    if cfg["eval_tasks"]:
        try:
            tasks = {int(x) for x in cfg["eval_tasks"].split(",")}
        except ValueError:
            return  # evaluate.py names the bad index list
        which = f"eval_tasks={cfg['eval_tasks']}"
    else:
        tasks = set(env.tasks_of_split(cfg, cfg["eval_split"]))
        which = f"eval_split={cfg['eval_split']}"
    if len(tasks) == 1:
        raise ConfigError(f"eval_memory=shuffle needs at least 2 evaluation tasks to swap memories between, and "
                          f"{which} gives 1: evaluate more tasks (eval_tasks=a,b or another eval_split)")


def check_training(cfg: dict):
    """What a training of `cfg` needs that its config alone decides (streams to hold out, held-out
    tasks, windows that fit a stream): checked by train.py before it claims the run folder, and
    by pipeline.py before it collects the data the training would refuse."""
    streams, ratio = cfg["n_stream"], cfg["test_stream_ratio"]
    val_tasks = env.tasks_of_split(cfg, "val")
    if ratio > 0 and int(round(ratio * streams)) < 1:
        fix = (f"raise it above {0.5 / streams:.3g}, or " if 0.5 / streams < SCHEMA["test_stream_ratio"].max
               else "")
        raise ConfigError(f"test_stream_ratio={ratio} holds out no stream of n_stream={streams} for the test/ "
                          f"losses; {fix}set test_stream_ratio=0 to take them from the validation tasks")
    if ratio == 0 and not val_tasks:
        raise ConfigError(f"test_stream_ratio=0 takes the test/ losses from the validation tasks, and val_env_ratio="
                          f"{cfg['val_env_ratio']} leaves none; raise val_env_ratio, or hold out streams of the "
                          "training tasks (test_stream_ratio > 0 with n_stream >= 2)")
    if cfg["eval_interval"] and not val_tasks:
        raise ConfigError(f"eval_interval={cfg['eval_interval']} rolls out on the validation tasks, and val_env_ratio="
                          f"{cfg['val_env_ratio']} leaves none; raise val_env_ratio or set eval_interval=0")
    check_window(cfg)


def check_window(cfg: dict):
    """A training window must fit in one stream of the data (after episode_stride's subsampling)."""
    length, note = steps_per_stream(cfg), ""
    if cfg["use_compressed_context"]:
        gap = region_gap(cfg["episode_stride"], cfg["horizon"], cfg["compress_interval"])
        if n_rollouts(cfg) < gap + 1:
            apart = f" {gap} rollouts apart (episode_stride={cfg['episode_stride']})" if gap > 1 else ""
            raise ConfigError(f"use_compressed_context=true trains on two regions (PPO rollouts) of a stream{apart}, "
                              f"and a stream holds {n_rollouts(cfg)}; raise total_source_timesteps (at least "
                              f"{(gap + 1) * cfg['n_steps'] * cfg['n_stream']}) or use use_compressed_context=false")
        return
    if cfg["episode_stride"] > 1 and length % cfg["horizon"] == 0:
        length = length // cfg["horizon"] // cfg["episode_stride"] * cfg["horizon"]
        note = f" once episode_stride={cfg['episode_stride']} keeps every {cfg['episode_stride']}th episode"
    if cfg["n_transit"] > length:
        raise ConfigError(f"n_transit={cfg['n_transit']} is longer than a stream of the data ({length} steps{note}: "
                          "total_source_timesteps / n_stream rounded up to whole n_steps rollouts); lower n_transit "
                          "or raise total_source_timesteps")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose argument errors are one line `error: ...` and exit code 2 (as
    every other user error), not a usage block; every command and script builds its parser
    from this class."""

    def error(self, message: str):
        print(f"error: {message.splitlines()[0] if message else 'bad arguments'} (see {self.prog} --help)",
              file=sys.stderr)
        sys.exit(2)


def config_arg_parser(description: str, config_files_help: str = "YAML config files, merged left to right",
                      set_example: str = "n_stream=4 device=cpu") -> argparse.ArgumentParser:
    """A command's parser: config files, --set overrides (`set_example`: ones this command accepts)."""
    parser = ArgumentParser(
        description=description, epilog="config keys (set in YAML files or with --set):" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help=config_files_help)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"override config keys, e.g. --set {set_example}")
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
        if disk_full(e):
            print(f"error: the disk is full ({e.strerror or first_line(e)}){where}; finished work is saved: free "
                  "space and rerun the same command", file=sys.stderr)
            sys.exit(2)
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
