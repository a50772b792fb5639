"""Collect the source learner's histories (PPO, QLearning, PosteriorSampling or NoisyExpert)
for every task of an environment into one HDF5 file.

    python collect.py config/algorithm/ppo_darkroom.yaml config/env/darkroom.yaml
    python collect.py config/algorithm/noisy_expert_dark_key_to_door.yaml config/env/dark_key_to_door_9x9_650.yaml
                                                 # an expert with decaying noise instead of PPO (AD-epsilon)
    python collect.py config/algorithm/posterior_sampling_dark_key_to_door.yaml config/env/dark_key_to_door_9x9_650.yaml
                                                 # a learner that searches by posterior sampling
    python collect.py config/algorithm/q_learning_dark_key_to_door.yaml config/env/dark_key_to_door_9x9_650.yaml
                                                 # tabular Q-learning, one learner per stream
    python collect.py config/algorithm/ppo_darkroom.yaml config/env/darkroom.yaml --set n_stream=4
    python collect.py ... --tasks 0:40          # a slice, e.g. on another machine
    python collect.py ... --merge a.hdf5 b.hdf5 # combine slices into the full file

The file is datasets/history_{env}_{alg}_alg-seed{alg_seed}.hdf5 (a slice adds
`.tasksA-B`). Each finished task is on disk at once; rerunning the same command after a
crash or Ctrl-C collects only what is missing. Both splits are collected: the held-out
tasks' source curves are the baseline that evaluate.py compares against. A task found damaged
(a dataset missing or unreadable) is collected again. One collection writes a file at a time.
"""
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

import env as envs
from algorithm import history, policy_loop, registry
from algorithm.history import dataset_path
from cli import config_arg_parser, load_config, run_cli
from config.loading import parse_set
from errors import UserError, disk_full
from files import check_writable_file, ensure_writable_dir
from runtime import check_memory, pick_device


def parse_slice(text: str, n_tasks: int) -> list[int]:
    try:
        a, b = (int(x) if x else None for x in text.split(":"))
    except ValueError:
        raise UserError(f"--tasks {text!r}: expected START:STOP, e.g. --tasks 0:40") from None
    indices = list(range(n_tasks))[slice(a, b)]
    if not indices:
        raise UserError(f"--tasks {text!r} selects no task (the environment has {n_tasks})")
    return indices


def slice_path(path: Path, indices: list[int]) -> Path:
    return path.with_name(f"{path.stem}.tasks{indices[0]}-{indices[-1] + 1}{path.suffix}")


def split_path(path: Path, split: str) -> Path:
    """A file of one split's tasks only, beside (never inside) the full dataset."""
    return path.with_name(f"{path.stem}.{split}{path.suffix}")


TORCH_PROCESS_BYTES = 300_000_000  # what a worker process carries before any task (torch itself)


def check_fits(cfg: dict, n_tasks: int):
    """Refuse sizes that cannot fit in memory: one task in each worker process (the batched
    backend cuts chunks of tasks to what fits, but never below one task per worker); a source other
    than PPO holds a chunk of tasks at once, with its policy's state (a Q table per stream)."""
    from algorithm.batched_ppo import bytes_per_task, observation_encoder
    device = pick_device(cfg["device"])
    policy = registry.POLICIES.get(cfg["alg"])
    if policy:
        tasks = min(policy_loop.chunk_size(cfg), n_tasks)
        per_stream = getattr(policy, "bytes_per_stream", lambda cfg: 0)(cfg)
        state = f" with the state of alg={cfg['alg']} per stream" if per_stream else ""
        check_memory("collection", {f"{tasks} task(s) of {cfg['n_stream']} streams x {history.steps_per_stream(cfg)} "
                                    f"steps{state}": tasks * policy_loop.bytes_per_task(cfg, per_stream)}, device,
                     ("use a smaller task_chunk (tasks held at once; the data stays the same), or " if tasks > 1
                      else "use ") + "a smaller n_stream, total_source_timesteps or grid_size")
        return
    obs_dim = observation_encoder(cfg, "cpu").dim if cfg["backend"] == "batched" else envs.state_dim(cfg)
    one = bytes_per_task(cfg, obs_dim)
    workers = 1 if device.type == "cuda" and cfg["backend"] == "batched" else min(cfg["n_process"], n_tasks)
    check_memory("collection", {f"one task of {cfg['n_stream']} streams x {history.steps_per_stream(cfg)} steps "
                                f"in each of {workers} process(es)": one * workers,
                                "the worker processes": TORCH_PROCESS_BYTES * workers if workers > 1 else 0},
                 device, "use a smaller n_stream, total_source_timesteps or n_process")


def collect(cfg: dict, path: Path, indices: list[int]):
    """Collect the missing (or damaged) tasks among `indices` into `path`."""
    if already_complete(cfg, path, indices):
        return
    registry.check(cfg)  # a family the source cannot play stops here, before any work
    check_fits(cfg, len(indices))
    ensure_writable_dir(path.parent, "dataset directory")
    check_writable_file(path, "dataset", "make it writable (chmod u+w) or use another dataset_dir")
    with history.lock(path), disk_full_is_one_line(path):
        _collect(cfg, path, indices)


@contextmanager
def disk_full_is_one_line(path: Path):
    """A full disk while writing the dataset is one line: every append is whole or undone
    (algorithm/journal.py), so the tasks finished before it are safe and a rerun goes on."""
    try:
        yield
    except OSError as e:
        if not disk_full(e):
            raise
        raise UserError(f"the disk is full while writing {path}; the tasks finished so far are safe; "
                        "free space and rerun the same command") from None


def already_complete(cfg: dict, path: Path, indices: list[int]) -> bool:
    """Whether every task is already on disk, undamaged: checked as a reader, without the
    lock, so that pipelines sharing a finished dataset can start side by side."""
    if not path.exists() or history.has_leftovers(path):  # leftovers are cleared under the lock
        return False
    header = history.read_header(path)
    if not header["done"]:  # nothing collected yet: _collect starts it again (with these settings)
        return False
    history.check_matches(path, header, cfg)
    if set(indices) - set(header["done"]) or history.damaged_tasks(path, header, indices):
        return False
    print(f"{path}: {len(indices)} of {len(indices)} tasks already collected, 0 to go "
          f"(backend={registry.backend_name(cfg)})")
    return True


def _collect(cfg: dict, path: Path, indices: list[int]):
    tasks, split = envs.task_list(cfg), envs.task_split(cfg)
    history.recover(path)  # finish or undo the append of a run killed while writing
    header = history.read_header(path) if path.exists() else None
    if header is not None and not header["done"]:
        # a collection stopped before its first task (e.g. out of memory) left only the header:
        # nothing to keep, so a rerun with other (smaller) settings starts the file again
        path.unlink()
        header = None
    if header is not None:
        history.check_matches(path, header, cfg)
        damaged = history.damaged_tasks(path, header, [i for i in indices if i in header["done"]])
        if damaged:
            print(f"{path}: {len(damaged)} damaged tasks will be collected again ({history.describe(damaged)})")
        done = set(header["done"]) - set(damaged)
    else:
        history.create_if_missing(path, cfg, tasks, split)
        done, damaged = set(), {}
    todo = [i for i in indices if i not in done]
    print(f"{path}: {len(indices) - len(todo)} of {len(indices)} tasks already collected, "
          f"{len(todo)} to go (backend={registry.backend_name(cfg)})")
    if not todo:
        return
    state_dim = envs.state_dim(cfg)
    # the bar counts env steps (every rollout of every task), so its rate and ETA move while
    # a chunk of tasks trains together; finished tasks are in the postfix
    per_task = history.steps_per_stream(cfg) * cfg["n_stream"]
    # smoothing=0: the rate is the average since the start; every rollout costs about the same
    bar = tqdm(total=len(todo) * per_task, unit="step", unit_scale=True, desc="collect", dynamic_ncols=True,
               smoothing=0)
    bar.set_postfix(tasks=f"0/{len(todo)}")
    start, steps, finished = time.perf_counter(), 0, 0

    def on_done(results: dict):
        for h in results.values():
            history.check_history(h, cfg, state_dim)
        history.append_tasks(path, results, tasks, split, registry.backend_name(cfg), replace=damaged)

    def progress(n_tasks: int, n_env_steps: int):
        nonlocal steps, finished
        steps += n_env_steps
        finished += n_tasks
        bar.set_postfix(tasks=f"{finished}/{len(todo)}", refresh=False)
        bar.update(n_env_steps)

    try:
        registry.collect(cfg, todo, tasks, on_done, progress)
    except BaseException:
        bar.leave = False  # the error's line is the last word, not a bar stopped half-way
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    print(f"collected {len(todo)} tasks, {steps:,} env steps in {elapsed:.1f}s "
          f"({steps / elapsed:,.0f} env-steps/s) -> {path}")


def main():
    parser = config_arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", metavar="START:STOP", help="collect only this slice of the task list "
                        "(written to a .tasksSTART-STOP file for --merge)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="collect only this split's tasks "
                        "(written to a .SPLIT file, e.g. to try a source's settings on the validation tasks with "
                        "scripts/source_curve.py FILE --split val before a full collection)")
    parser.add_argument("--merge", nargs="+", metavar="FILE", help="merge these slice files into the "
                        "full dataset file instead of collecting; refuses files collected with other settings")
    args = parser.parse_args()
    if args.tasks and args.split:
        parser.error("--tasks and --split both choose the tasks to collect: give one of them")
    if args.merge and (args.tasks or args.split):  # a merge combines whole slice files: a slice of it means nothing
        parser.error("--tasks and --split select what to collect, and --merge collects nothing: drop them "
                     "(the merge takes every task of the files given)")
    cfg = load_config(args.configs, parse_set(args.set))
    path = dataset_path(cfg)
    if args.merge:
        for p in args.merge:
            history.check_matches(Path(p), history.read_header(Path(p)), cfg)
        ensure_writable_dir(path.parent, "dataset directory")
        check_writable_file(path, "dataset", "make it writable (chmod u+w) or use another dataset_dir")
        with history.lock(path), disk_full_is_one_line(path):
            added, have, total = history.merge(path, [Path(p) for p in args.merge])
        print(f"merged {added} tasks into {path}: {have} of {total} tasks present")
        return
    n_tasks = len(envs.task_list(cfg))
    indices = parse_slice(args.tasks, n_tasks) if args.tasks else list(range(n_tasks))
    if args.tasks:
        path = slice_path(path, indices)
    if args.split:
        indices = envs.tasks_of_split(cfg, args.split)
        path = split_path(path, args.split)
    collect(cfg, path, indices)


if __name__ == "__main__":
    run_cli(main)
