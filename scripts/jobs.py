"""Run the pipeline's stages (collect.py, train.py, evaluate.py): one at a time with their output
on the terminal (`run`), or several at a time, each logging to its own file (`run_jobs`). A stage
that fails stops the pipeline with the stage's exit code; finished stages are reused on a rerun.

On a GPU box the CPU-size and 9x9 models use a sliver of the GPU each, so several
trainings share it; on 2 CPU cores two at a time is the most that helps.
"""
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stop_with_parent():
    """In a stage's process, before it starts (Linux): get SIGTERM when this script dies, even
    by kill -9, instead of running on unseen (it would hold its run directory or dataset)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the stage runs to its end, which is safe too
        pass


def run(cmd: list[str]) -> float:
    print("\n$ " + " ".join(cmd), flush=True)
    tic = time.perf_counter()
    code = subprocess.run([sys.executable, *cmd], cwd=ROOT, preexec_fn=stop_with_parent).returncode
    if code == 2:  # the stage explained the problem in one line; finished stages are reused on the next run
        sys.exit(code)
    if code != 0:
        print(f"stopped: `{cmd[0]}` exited with code {code}; fix the cause and rerun, finished stages are kept",
              file=sys.stderr)
        sys.exit(code)
    return time.perf_counter() - tic


def run_jobs(jobs: list[tuple[str, list[str]]], n_parallel: int, log_dir: Path) -> dict:
    """Run (name, argv) jobs, n_parallel at a time, each logging to log_dir/name.log;
    stop at the first failure. Returns seconds per job. Logs are appended to, each run
    under a `=== <time> <command>` line: a rerun (a study adding seeds) keeps earlier logs."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, seconds = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < n_parallel:
            name, argv = pending.pop(0)
            log = open(log_dir / f"{name}.log", "a")
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
            log.flush()
            print(f"  start {name}: {' '.join(argv)}", flush=True)
            running[name] = (subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                              preexec_fn=stop_with_parent),
                             time.perf_counter(), log)
        time.sleep(1)
        for name, (proc, tic, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            seconds[name] = time.perf_counter() - tic
            if proc.returncode != 0:
                for other, _, other_log in running.values():
                    other.terminate()  # SIGTERM: a training saves its checkpoint and stops
                    other.wait()
                    other_log.close()
                tail = (log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
                print(f"stopped: {name} exited with code {proc.returncode}: {tail[0] if tail else ''} "
                      f"(log: {log_dir / name}.log); finished stages are kept", file=sys.stderr)
                sys.exit(proc.returncode)
            print(f"  done  {name} ({seconds[name] / 60:.1f} min)", flush=True)
    return seconds
