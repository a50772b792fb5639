"""Training throughput and memory: dense AD vs two-region vs one target per window.

    .venv/bin/python bench/train.py            # default size, about 1-2 min on 2 CPU cores
    .venv/bin/python bench/train.py --quick    # ~10 s smoke run
    .venv/bin/python bench/train.py --reps 5 --steps 20 --batch-size 64

What one training step is: forward + backward + gradient clip + AdamW step, exactly as in
train.py (model.loss, `zero_grad(set_to_none=True)`, `clip_grad_norm_`, AdamW with the
training betas), on the darkroom transformer of config/model/ad_dr.yaml (width, layers,
heads and state embedding as that file has them at run time; the JSON lines state them).
The context sizes are pinned by flags, not read from the configs: --n-transit (240) for
the AD windows, --region (80, = PPO n_steps) for the two-region samples, --batch-size (32)
samples per batch for every variant. Batches are built before timing (data loading is not
measured) from a random synthetic darkroom stream with the dataset's own token builders
(`tokens.window_tokens`, `tokens.region_tokens`), so no dataset file is needed.

Variants (the same number of samples per batch):
  a     standard AD, dense supervision: windows of n_transit=240 steps, an action target
        at every one of the 240 step tokens.
  b     two-region compressed mode (config/model/ad_dr_compressed.yaml: marker tokens,
        token-type head): samples [<compress> region k-1 </compress> <compress> region k
        </compress>] of two 80-step PPO regions + 4 markers = 164 tokens, 160 action
        targets (+ token-type targets). A target there sees up to 160 past steps; an AD
        window of 240 lets its targets see up to 240, so the fair unit is per target
        (targets/s), not per sample.
  c     one target per window (the seed lineage's way): the same 240-step windows as (a),
        loss only on the last token (the forward/backward cost is that of (a)).
  a_eq  (extra) dense AD with n_transit = 2 x region = 160: every target sees up to the
        same 160 past steps as in (b) -- the equal-history-coverage baseline for (b).

Each variant lives in its own worker process (started once, so the ~5 s torch import is
paid once; workers wait idle while another one runs); repetitions are interleaved
(a, b, c, a_eq, a, b, ...) and medians reported. Workers use one torch thread by default
(--threads): on 2 cores shared with other processes, 2 intra-op threads measured ~9x
slower and far noisier (ratios between variants are what this benchmark is for). --quick
runs all variants in this process (no peak memory then). Reported:
  targets_per_s     supervised action targets per second of training steps;
  tokens_per_s      tokens the transformer processes per second;
  peak memory       CPU: the process's peak resident set size (VmHWM, reset just before
                    the first training step via /proc/self/clear_refs; ru_maxrss where that
                    is not possible) over all of the variant's steps, minus the RSS before
                    the first step, i.e. what training adds to a process that holds the
                    model and the batches (activations, gradients, AdamW state, allocator
                    slack); CUDA: torch.cuda.max_memory_allocated above the allocation
                    before the first step.
  activation_mb     bytes of the tensors autograd saves for backward in one step (counted
                    with torch.autograd.graph.saved_tensors_hooks, unique storages, model
                    parameters excluded): deterministic, allocator-independent.
Timings are never asserted; compare ratios from one run only.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _toolkit import ROOT  # noqa: E402  (first: puts the toolkit, not bench/ siblings, on sys.path)

ALG = ROOT / "config/algorithm/ppo_darkroom.yaml"
ENV = ROOT / "config/env/darkroom.yaml"
MODEL = {"a": "ad_dr.yaml", "b": "ad_dr_compressed.yaml", "c": "ad_dr.yaml", "a_eq": "ad_dr.yaml"}
DESCRIPTION = {
    "a": "standard AD, dense supervision, {n}-step windows",
    "b": "two-region: <c> {r} steps </c> <c> {r} steps </c>, dense supervision",
    "c": "one target per window: {n}-step windows, loss on the last token only",
    "a_eq": "standard AD, dense supervision, {r2}-step windows (same max history per target as b)",
}


# ----------------------------------------------------------------------------- memory helpers

def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return kb / 1024


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return kb / 1024


def saved_activation_mb(model, run_forward) -> float:
    """MB of the tensors autograd keeps for backward in run_forward() (unique storages,
    parameters excluded); the graph is dropped without a backward pass."""
    import torch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_forward()
    del out
    return sum(seen.values()) / 2**20


# ----------------------------------------------------------------------------- batches

def synthetic_stream(T: int, grid: int, horizon: int, n_actions: int, seed: int) -> dict:
    """One random darkroom-like stream ({field: (T, ...) array}); the cost of a training
    step does not depend on the values, only on the shapes."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return {"states": rng.integers(0, grid, (T, 2)).astype(np.float32),
            "actions": rng.integers(0, n_actions, T),
            "rewards": (rng.random(T) < 0.1).astype(np.float32),
            "dones": np.arange(T) % horizon == horizon - 1}


def stack(samples: list[dict]):
    import numpy as np
    import torch
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def training_loss(model, batch: dict):
    """The loss train.py computes on a batch of token dicts with their targets."""
    from model.ad import split_targets
    return model(*split_targets(batch))[1]


def make_batches(variant: str, cfg: dict, batch_size: int, n_batches: int, seed: int) -> list[dict]:
    import numpy as np

    import env as envs
    from model.ad import IGNORE
    from tokens import concat_tokens, region_tokens, window_tokens
    interval = cfg["compress_interval"]
    T = max(2000, 4 * cfg["n_transit"], 4 * interval)
    stream = synthetic_stream(T, cfg["grid_size"], cfg["horizon"], envs.n_actions(cfg), seed)
    rng = np.random.default_rng(seed + 1)
    batches = []
    for _ in range(n_batches):
        samples = []
        for _ in range(batch_size):
            if variant == "b":
                k = int(rng.integers(1, T // interval - 1))  # regions k-1 and k: [(k-1)i, (k+1)i) <= T
                parts = (region_tokens(cfg, stream, (k - 1) * interval, k * interval)
                         + region_tokens(cfg, stream, k * interval, (k + 1) * interval))
                samples.append(concat_tokens(parts))
            else:
                a = int(rng.integers(0, T - cfg["n_transit"] + 1))
                s = window_tokens(cfg, stream, a, a + cfg["n_transit"])
                if variant == "c":
                    s["action"][:-1] = IGNORE
                samples.append(s)
        batches.append(stack(samples))
    return batches


# ----------------------------------------------------------------------------- worker processes

IN_PROCESS_MEMORY = ("peak memory not measured: all variants ran in one process (--quick / --in-process), "
                     "where one variant's peak hides the next one's; activation_mb is still exact")

class Worker:
    """A benchmark variant in its own process: `--_worker SPEC` runs `serve()` there.

    Protocol: one JSON object per line. The worker sets up, answers {"ready": ...}, then
    answers each command line ({"cmd": "run", ...} or {"cmd": "finish"}) with one line."""

    def __init__(self, script: str, spec: dict):
        import subprocess
        self.spec = spec
        self.proc = subprocess.Popen([sys.executable, script, "--_worker", json.dumps(spec)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._ready = None

    def ready(self) -> dict:
        if self._ready is None:
            self._ready = self._read()
        return self._ready

    def call(self, cmd: str, **kw) -> dict:
        self.ready()
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if cmd == "finish":
            self.proc.wait()
        return out

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise SystemExit(f"benchmark worker {self.spec} died (exit {code}); see the error above")
        return json.loads(line)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def serve(spec: dict, setup):
    """Worker side: state = setup(spec) (with .ready, .run(**kw), .finish()); then the command loop."""
    state = setup(spec)
    print(json.dumps({"ready": True, **getattr(state, "ready", {})}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.pop("cmd") == "finish":
            print(json.dumps(state.finish()), flush=True)
            return
        print(json.dumps(state.run(**cmd)), flush=True)


class InProcess:
    """The Worker interface without a process (--quick: one torch import instead of one per
    variant). Memory is then measured in a process that already ran the earlier variants,
    so freed-but-kept allocator memory makes later variants' peaks look smaller."""

    def __init__(self, setup, spec: dict):
        self.setup, self.spec, self.state, self._ready = setup, spec, None, None

    def ready(self) -> dict:
        if self._ready is None:
            self.state = self.setup(self.spec)
            self._ready = {"ready": True, **getattr(self.state, "ready", {})}
        return self._ready

    def call(self, cmd: str, **kw) -> dict:
        self.ready()
        out = self.state.finish() if cmd == "finish" else self.state.run(**kw)
        if cmd == "finish":
            self.state = None  # free the variant's memory before the next one is set up
        return out

    def kill(self):
        self.state = None


def start_workers(script: str, specs: list[dict], setup=None, in_process: bool = False) -> list:
    """Start all workers (their set-up runs concurrently; nothing is timed then) and wait.
    With in_process, set-ups run lazily in this process, when a variant is first called."""
    if in_process:
        return [InProcess(setup, s) for s in specs]
    workers = [Worker(script, s) for s in specs]
    try:
        for w in workers:
            w.ready()
    except BaseException:
        for w in workers:
            w.kill()
        raise
    return workers


def memory_tracker(device):
    """Call before the measured work: returns a function giving (peak MB above now, description)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        return lambda: ((torch.cuda.max_memory_allocated(device) - before) / 2**20,
                        "torch.cuda.max_memory_allocated above the allocation before the measured work")
    before = rss_mb()
    if reset_peak_rss():
        return lambda: (peak_rss_mb() - before,
                        "peak RSS (VmHWM, reset before the measured work) minus RSS before it, fresh process")
    return lambda: (peak_rss_mb(), "ru_maxrss of the whole worker process (high-water mark could not be reset)")


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- one variant

class TrainVariant:
    """Worker state: model, AdamW and pre-built batches of one variant."""

    def __init__(self, spec: dict):
        import torch

        import env as envs
        from cli import load_config
        from model import build
        from runtime import pick_device

        self.variant = spec["variant"]
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        overrides = {"device": spec["device"], "n_transit": spec["n_transit"], "train_batch_size": spec["batch_size"]}
        if self.variant == "a_eq":
            overrides["n_transit"] = 2 * spec["region"]
        if self.variant == "b":  # a region is one PPO rollout: compress_interval = n_steps
            overrides |= {"n_transit": 2 * spec["region"], "compress_interval": spec["region"],
                          "n_steps": spec["region"], "batch_size": spec["region"]}
        cfg = load_config([ALG, ENV, ROOT / "config/model" / MODEL[self.variant]], overrides)
        self.cfg, self.device = cfg, pick_device(cfg["device"])
        torch.manual_seed(spec["seed"])
        self.model = build(cfg, envs.model_inputs(cfg)).to(self.device)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                     betas=(0.9, 0.95))
        self.batches = [{k: v.to(self.device) for k, v in b.items()} for b in
                        make_batches(self.variant, cfg, spec["batch_size"], spec["pool"], spec["seed"])]
        self.i = 0
        self.memory = memory_tracker(self.device)
        self.run(spec["warmup"])  # untimed: first steps allocate AdamW state and warm caches
        self.ready = {"threads": torch.get_num_threads(), "device": str(self.device),
                      "model": {k: cfg[k] for k in ("tf_n_embd", "tf_n_layer", "tf_n_head", "state_embedding",
                                                    "n_transit", "use_compressed_context")}}

    def _step(self, batch):
        import torch
        loss = training_loss(self.model, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.opt.step()

    def run(self, steps: int) -> dict:
        from model.ad import IGNORE
        targets = tokens = 0
        sync(self.device)
        tic = time.perf_counter()
        for _ in range(steps):
            b = self.batches[self.i % len(self.batches)]
            self.i += 1
            self._step(b)
            targets += int((b["action"] != IGNORE).sum())  # as train.count_targets
            tokens += b["state"].numel()
        sync(self.device)
        elapsed = time.perf_counter() - tic
        return {"seconds": elapsed, "targets_per_s": targets / elapsed, "tokens_per_s": tokens / elapsed,
                "step_ms": 1000 * elapsed / max(steps, 1), "targets_per_step": targets / max(steps, 1)}

    def finish(self) -> dict:
        peak, how = self.memory()
        b = self.batches[0]
        return {"peak_mem_mb": peak, "memory_measure": how, "n_params": self.model.num_params(),
                "tokens_per_sample": int(b["state"].shape[1]),
                "activation_mb": saved_activation_mb(self.model, lambda: training_loss(self.model, b))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--variants", default="a,b,c,a_eq", help="comma-separated subset of a,b,c,a_eq")
    p.add_argument("--n-transit", type=int, default=240, help="AD window in steps for variants a and c")
    p.add_argument("--region", type=int, default=80, help="two-region: steps per region (= PPO n_steps); "
                   "a_eq uses windows of 2 x region")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch for every variant")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per repetition")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--pool", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--reps", type=int, default=4, help="repetitions per variant, interleaved; medians reported")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per worker (0 = torch default). 1 by default: on a 2-core "
                        "machine that other processes keep busy, 2 threads measured ~9x slower and far noisier")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true",
                   help="run all variants in this process (saves a torch import per variant; memory "
                        "numbers then less clean)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 4, 2 steps, 1 rep, --in-process")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        serve(json.loads(args._worker), TrainVariant)
        return
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.pool, args.reps = 4, 2, 1, 2, 1
        args.in_process = True
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in MODEL]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(MODEL)}")
    specs = [{"variant": v, "batch_size": args.batch_size, "warmup": args.warmup, "pool": args.pool,
              "n_transit": args.n_transit, "region": args.region,
              "threads": args.threads, "device": args.device, "seed": args.seed} for v in variants]
    workers = start_workers(__file__, specs, TrainVariant, args.in_process)
    try:
        runs = {v: [] for v in variants}
        for rep in range(args.reps):
            for v, w in zip(variants, workers):  # interleaved: a, b, c, a_eq, a, b, ...
                r = w.call("run", steps=args.steps)
                runs[v].append(r)
                print(f"[rep {rep + 1}/{args.reps}] {v}: {r['targets_per_s']:.0f} targets/s, "
                      f"{r['step_ms']:.0f} ms/step", file=sys.stderr, flush=True)
        final = {v: w.call("finish") for v, w in zip(variants, workers)}
    finally:
        for w in workers:
            w.kill()
    med = {}
    for v, w in zip(variants, workers):
        rs, f = runs[v], final[v]
        m = {k: statistics.median(r[k] for r in rs) for k in ("targets_per_s", "tokens_per_s", "step_ms")}
        m |= {"peak_mem_mb": None if args.in_process else f["peak_mem_mb"], "activation_mb": f["activation_mb"]}
        med[v] = m
        print(json.dumps({
            "bench": "train", "variant": v,
            "what": DESCRIPTION[v].format(n=args.n_transit, r=args.region, r2=2 * args.region),
            "model": w.ready()["model"],
            "batch_size": args.batch_size, "tokens_per_sample": f["tokens_per_sample"],
            "targets_per_step": rs[0]["targets_per_step"], "steps_per_rep": args.steps, "warmup": args.warmup,
            "reps": args.reps, "device": w.ready()["device"], "threads": w.ready()["threads"],
            "n_params": f["n_params"], **{k: None if x is None else round(x, 2) for k, x in m.items()},
            "targets_per_s_reps": [round(r["targets_per_s"], 1) for r in rs],
            "memory_measure": IN_PROCESS_MEMORY if args.in_process else f["memory_measure"]}))
    ratios = {}
    speed = [("a", "c", "targets_per_s"), ("b", "a", "targets_per_s"), ("b", "a_eq", "targets_per_s"),
             ("a", "c", "step_ms"), ("b", "a", "step_ms")]
    for x, y, k in speed:  # median over repetitions of the ratio within each repetition
        if x in runs and y in runs:
            ratios[f"{k}_{x}/{y}"] = round(statistics.median(rx[k] / ry[k] for rx, ry in zip(runs[x], runs[y])), 3)
    memory = [("b", "a", "peak_mem_mb"), ("b", "a_eq", "peak_mem_mb"), ("a", "c", "peak_mem_mb"),
              ("b", "a", "activation_mb"), ("b", "a_eq", "activation_mb")]
    for x, y, k in memory:
        if x in med and y in med and med[x][k] is not None and med[y][k]:
            ratios[f"{k}_{x}/{y}"] = round(med[x][k] / med[y][k], 3)
    if ratios:
        print(json.dumps({"bench": "train", "ratios": ratios,
                          "of": "speed: median over repetitions of the per-repetition ratio (interleaved); "
                                "memory: ratio of the per-variant peaks",
                          "batch_size": args.batch_size, "steps_per_rep": args.steps, "reps": args.reps,
                          "threads": args.threads}))


if __name__ == "__main__":
    main()
