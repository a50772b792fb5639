"""CompressedAD: (i) depth-bucketed training batches vs the old padded way; (ii) rollout
memory and speed of CompressedAD vs full-context AD as the history grows.

    .venv/bin/python bench/compressed.py              # both parts, about 1.5 min on 2 CPU cores
    .venv/bin/python bench/compressed.py --quick      # ~15 s smoke run
    .venv/bin/python bench/compressed.py --part ii --histories 1000,4000,16000,32000 --max-ad-history 16000

Model: config/model/ad_compressed_dr.yaml as it is at run time (n_transit recent steps,
stages of n_transit // 2 steps, n_latent latents, enc_n_layer encoder layers,
max_compression_depth, grad_compression_rounds; the JSON lines state them), untrained,
with config/algorithm/ppo_base.yaml and config/env/darkroom.yaml; --batch-size (32)
samples per training batch.

(i) Training. Data: a tiny synthetic learning-history file written to a temporary
directory with tests/fixtures_history.py (uniformly random policy; --tasks training
tasks x 4 streams of 1,040 steps, the real stream length, so every depth up to the max occurs;
the history file layout of docs/file-formats.md), read by the real `CompressedADDataset`.
  bucketed  the first --pool batches of a real `BucketSampler` epoch, collated by
            `collate_compressed_batch` (one depth per batch, padding only within a stage);
  old       THE OLD WAY, re-implemented in this file only as a baseline
            (`collate_old_padded`): exactly the same samples, shuffled into mixed-depth
            batches of the same size; each batch padded to its deepest depth by putting
            dummy all-zero stages in front of a sample's real stages; the encoder
            processes the dummy stages like real ones (they count as real tokens in the
            mask, as they did before bucketing: "the encoder processed meaningless zero
            tensors").
One repetition = one pass over the same samples in each variant (same targets, same real
tokens); each variant in its own worker process, passes interleaved. Reported:
real_tokens_per_s (stage + recent tokens that are data, not padding), targets_per_s,
processed_tokens (incl. padding and dummy stages), collate_ms, peak memory (CPU: peak RSS
above the RSS before training, fresh process; CUDA: max_memory_allocated) and the bytes
autograd saves for backward per step (mean and max over the batches; exact).

(ii) Rollouts. For each history length h (--histories), in its own worker process:
  compressed  CompressedAD with its LatentMemory (latents + at most n_transit recent steps);
  ad_full     AD with n_transit = h (no window: the whole history is the context).
The context is first brought to h - probe steps (untimed): AD's preallocated KV cache and
token buffer are filled with random values up to that length (attention cost and memory
do not depend on the values); CompressedAD is fast-forwarded through its real compression
path (`LatentMemory._compress` on random tokens, one per stage, the cache re-encoded
each time). Then --probe real rollout steps are timed (default: the smallest multiple of
the stage length >= 80 steps, so every probe holds the same number of compressions; 8
held-out goals x --rollouts, the rollout() token and sampling code, one CPU thread as
rollout() uses); AD's context is rewound to h - probe before each repetition, so every AD
probe covers steps h-probe+1..h (CompressedAD's cost per step does not depend on h).
Reported: env-steps/s at history h, context_mb (bytes of the KV cache + token buffers +
latents, from the tensors) and peak RSS above the RSS after building the model.
AD histories above --max-ad-history are not run but extrapolated from the measured ones
(linear fits of ms/step and memory in h; marked "method": "extrapolated").
Timings are never asserted; compare ratios from one run only.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time

from _toolkit import ROOT  # noqa: E402  (first: puts the toolkit, not bench/ siblings, on sys.path)

from bench.train import IN_PROCESS_MEMORY, memory_tracker, rss_mb, saved_activation_mb, serve, start_workers, sync

BASE = [ROOT / "config/algorithm/ppo_base.yaml", ROOT / "config/env/darkroom.yaml"]
COMPRESSED = ROOT / "config/model/ad_compressed_dr.yaml"
AD = ROOT / "config/model/ad_dr.yaml"
STREAM_STEPS, N_STREAM = 1040, 4


def compressed_cfg(device: str, dataset_dir: str = "datasets") -> dict:
    from cli import load_config
    return load_config(BASE + [COMPRESSED], {
        "device": device, "n_stream": N_STREAM, "total_source_timesteps": STREAM_STEPS * N_STREAM,
        "test_stream_ratio": 0.25, "dataset_dir": str(dataset_dir), "num_workers": 0})


# ----------------------------------------------------------------------------- (i) bucketing

def collate_old_padded(items: list[dict]) -> dict:
    """THE OLD WAY (before BucketSampler), a baseline for this benchmark only.

    Mixed compression depths in one batch: every sample is padded to the deepest depth D
    in the batch with dummy all-zero stages placed before its real stages (so its real
    stages stay the last compressions before its recent steps); slot i is padded to the
    longest stage in that slot, and the dummy stages count as real tokens in the mask, so
    the encoder processes them like data."""
    import numpy as np

    from dataset import _stack
    D = max(item["compression_depth"] for item in items)
    stages = []
    for slot in range(D):
        real = [item["stages"][slot - (D - item["compression_depth"])]
                if slot >= D - item["compression_depth"] else None for item in items]
        L = max(len(s["state"]) for s in real if s is not None)
        template = next(s for s in real if s is not None)
        dummy = {k: np.zeros(L, dtype=v.dtype) for k, v in template.items()}
        stages.append(_stack([s if s is not None else dummy for s in real]))
    recent = _stack([item["recent"] for item in items])
    recent.pop("mask")
    return {"num_compression_stages": D, "compression_stages": stages, "recent": recent}


def real_stage_tokens(items: list[dict]) -> int:
    return sum(len(s["state"]) for item in items for s in item["stages"])


def processed_tokens(batch: dict) -> int:
    return sum(int(s["state"].numel()) for s in batch["compression_stages"]) + int(batch["recent"]["state"].numel())


def training_loss(model, batch: dict):
    """The loss train.py computes on a collate_compressed_batch batch."""
    from model.compressed import split_compressed_batch
    return model(*split_compressed_batch(batch))[1]


class BucketVariant:
    def __init__(self, spec: dict):
        import numpy as np
        import torch

        import env as envs
        from dataset import BucketSampler, CompressedADDataset, collate_compressed_batch
        from model import build
        from runtime import pick_device
        from train import to_device  # the root train.py (sys.path[0] = ROOT)

        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        cfg = compressed_cfg(spec["device"], spec["dataset_dir"])
        cfg["train_batch_size"] = spec["batch_size"]
        self.cfg, self.device = cfg, pick_device(cfg["device"])
        ds = CompressedADDataset(spec["path"], cfg, task_indices=spec["tasks"])
        sampler = BucketSampler(ds, spec["batch_size"], seed=spec["seed"])
        bucket_batches = [b for _, b in zip(range(spec["pool"]), iter(sampler))]
        if spec["variant"] == "bucketed":
            index_batches, collate = bucket_batches, collate_compressed_batch
        else:  # the same samples, mixed depths
            flat = np.random.default_rng(spec["seed"]).permutation([i for b in bucket_batches for i in b])
            B = spec["batch_size"]
            index_batches, collate = [flat[i:i + B].tolist() for i in range(0, len(flat), B)], collate_old_padded
        samples = [[ds[i] for i in b] for b in index_batches]
        tic = time.perf_counter()
        self.batches = [collate(items) for items in samples]
        self.collate_ms = 1000 * (time.perf_counter() - tic) / len(self.batches)
        self.real_tokens = sum(real_stage_tokens(items) + sum(len(it["recent"]["state"]) for it in items)
                               for items in samples)
        self.processed = sum(processed_tokens(b) for b in self.batches)
        self.targets = sum(int((b["recent"]["action"] >= 0).sum()) for b in self.batches)
        self.depths = [b["num_compression_stages"] for b in self.batches]
        self.sample_depths = sorted(it["compression_depth"] for items in samples for it in items)
        self.batches = [to_device(b, self.device) for b in self.batches]
        torch.manual_seed(spec["seed"])
        self.model = build(cfg, envs.model_inputs(cfg)).to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                     betas=(0.9, 0.95))
        self.memory = memory_tracker(self.device)
        for b in self.batches[:spec["warmup"]]:
            self._step(b)
        self.ready = {"threads": torch.get_num_threads(), "device": str(self.device)}

    def _step(self, batch):
        import torch
        loss = training_loss(self.model, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.opt.step()

    def run(self) -> dict:
        """One pass over all batches."""
        sync(self.device)
        tic = time.perf_counter()
        for b in self.batches:
            self._step(b)
        sync(self.device)
        return {"seconds": time.perf_counter() - tic}

    def finish(self) -> dict:
        peak, how = self.memory()
        act = [saved_activation_mb(self.model, lambda b=b: training_loss(self.model, b)) for b in self.batches]
        return {"peak_mem_mb": peak, "memory_measure": how, "activation_mb_mean": statistics.mean(act),
                "activation_mb_max": max(act), "collate_ms_per_batch": self.collate_ms,
                "real_tokens_per_pass": self.real_tokens, "processed_tokens_per_pass": self.processed,
                "targets_per_pass": self.targets, "batches": len(self.batches), "batch_depths": self.depths,
                "sample_depth_counts": {d: self.sample_depths.count(d) for d in sorted(set(self.sample_depths))}}


def part_i(args) -> None:
    import env as envs
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_history import build_history_file
    with tempfile.TemporaryDirectory(prefix="bench_compressed_") as tmp:
        cfg = compressed_cfg(args.device, tmp)
        tasks = envs.tasks_of_split(cfg, "train")[:args.tasks]
        path = build_history_file(cfg, task_indices=tasks, seed=args.seed)
        specs = [{"variant": v, "path": str(path), "dataset_dir": tmp, "tasks": tasks, "batch_size": args.batch_size,
                  "pool": args.pool, "warmup": args.warmup, "threads": args.threads, "device": args.device,
                  "seed": args.seed} for v in ("bucketed", "old")]
        workers = start_workers(__file__, specs, BucketVariant, args.in_process)
        try:
            runs = {"bucketed": [], "old": []}
            for rep in range(args.reps):
                for spec, w in zip(specs, workers):
                    r = w.call("run")
                    runs[spec["variant"]].append(r)
                    print(f"[(i) rep {rep + 1}/{args.reps}] {spec['variant']}: {r['seconds']:.1f} s per pass",
                          file=sys.stderr, flush=True)
            final = {spec["variant"]: w.call("finish") for spec, w in zip(specs, workers)}
        finally:
            for w in workers:
                w.kill()
    rows = {}
    for spec, w in zip(specs, workers):
        v, f = spec["variant"], final[spec["variant"]]
        sec = statistics.median(r["seconds"] for r in runs[v])
        rows[v] = {"bench": "compressed", "part": "i_training", "variant": v,
                   "what": ("BucketSampler + collate_compressed_batch" if v == "bucketed" else
                            "OLD WAY (benchmark-only re-implementation): mixed depths, padded to the deepest "
                            "depth of the batch with dummy all-zero stages"),
                   "batch_size": args.batch_size, "batches_per_pass": f["batches"], "reps": args.reps,
                   "settings": model_settings(compressed_cfg("cpu")),
                   "tasks": args.tasks, "stream_steps": STREAM_STEPS, "device": w.ready()["device"],
                   "threads": w.ready()["threads"], "batch_depths": f["batch_depths"],
                   "sample_depth_counts": f["sample_depth_counts"],
                   "seconds_per_pass": round(sec, 3), "seconds_reps": [round(r["seconds"], 2) for r in runs[v]],
                   "real_tokens_per_s": round(f["real_tokens_per_pass"] / sec, 1),
                   "targets_per_s": round(f["targets_per_pass"] / sec, 1),
                   "real_tokens_per_pass": f["real_tokens_per_pass"],
                   "processed_tokens_per_pass": f["processed_tokens_per_pass"],
                   "collate_ms_per_batch": round(f["collate_ms_per_batch"], 1),
                   "peak_mem_mb": None if args.in_process else round(f["peak_mem_mb"], 1),
                   "activation_mb_mean": round(f["activation_mb_mean"], 1),
                   "activation_mb_max": round(f["activation_mb_max"], 1),
                   "memory_measure": IN_PROCESS_MEMORY if args.in_process else f["memory_measure"]}
        print(json.dumps(rows[v]))
    b, o = rows["bucketed"], rows["old"]
    ratio = {"speedup_bucketed_vs_old": round(statistics.median(
                 ro["seconds"] / rb["seconds"] for rb, ro in zip(runs["bucketed"], runs["old"])), 3),
             "activation_mem_mean_bucketed/old": round(b["activation_mb_mean"] / o["activation_mb_mean"], 3),
             "activation_mem_max_bucketed/old": round(b["activation_mb_max"] / o["activation_mb_max"], 3),
             "processed_tokens_bucketed/old": round(b["processed_tokens_per_pass"] / o["processed_tokens_per_pass"], 3)}
    if b["peak_mem_mb"] and o["peak_mem_mb"]:
        ratio["peak_mem_bucketed/old"] = round(b["peak_mem_mb"] / o["peak_mem_mb"], 3)
    print(json.dumps({"bench": "compressed", "part": "i_training", "ratios": ratio,
                      "of": "speedup: median over interleaved passes of old/bucketed seconds on the same samples",
                      "seed_claim": "15-20% faster training, 20-30% less memory"}))


# ----------------------------------------------------------------------------- (ii) rollouts

def tensor_mb(*tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20


class RolloutVariant:
    def __init__(self, spec: dict):
        import numpy as np
        import torch

        import env as envs
        from cli import load_config
        from model import build
        from model.rollout import make_policy_context
        from runtime import pick_device

        torch.set_num_threads(1)  # as rollout() does on CPU
        h, k, self.kind = spec["history"], spec["probe"], spec["kind"]
        if self.kind == "compressed":
            cfg = load_config(BASE + [COMPRESSED], {"device": spec["device"]})
        else:  # full context: the window is the whole history
            cfg = load_config(BASE + [AD], {"device": spec["device"], "n_transit": h})
        self.cfg, self.device, self.h, self.k = cfg, pick_device(cfg["device"]), h, k
        torch.manual_seed(spec["seed"])
        self.model = build(cfg, envs.model_inputs(cfg)).to(self.device).eval()
        tasks = envs.tasks_of_split(cfg, "test")[:spec["goals"]]
        goals = [envs.task_list(cfg)[i] for i in tasks for _ in range(spec["rollouts"])]
        self.env = envs.make_batched_env(cfg, goals)
        self.B = len(goals)
        self.rng = np.random.default_rng(spec["seed"])
        self.rss_model = rss_mb()
        self.memory = memory_tracker(self.device)
        with torch.no_grad():
            self.ctx, self.policy = make_policy_context(self.model, cfg, self.B, self.device, use_cache=True)
            self._fast_forward(h - k)
        self.ready = {"device": str(self.device), "B": self.B}

    def _random_tokens(self, n: int, seed: int) -> dict:
        import torch

        import env as envs
        g = torch.Generator().manual_seed(seed)
        t = {"kind": torch.zeros(self.B, n, dtype=torch.long),
             "state": torch.randint(0, envs.n_state_tokens(self.cfg), (self.B, n), generator=g),
             "prev_action": torch.randint(0, envs.n_actions(self.cfg) + 1, (self.B, n), generator=g),
             "prev_reward": (torch.rand(self.B, n, generator=g) < 0.1).float(),
             "new_episode": (torch.arange(n) % self.cfg["horizon"] == 0).long().expand(self.B, n).contiguous()}
        return {key: v.to(self.device) for key, v in t.items()}

    def _fast_forward(self, n: int):
        """Bring the context to n steps of history without timing (and without holding more
        than one stage of extra tokens, so the peak memory is the rollout's own)."""
        import env as envs
        if self.kind == "ad_full":  # random values in place: cost and memory do not depend on them
            ctx = self.ctx
            ctx.buf["state"][:, :n].random_(0, envs.n_state_tokens(self.cfg))
            ctx.buf["prev_action"][:, :n].random_(0, envs.n_actions(self.cfg) + 1)
            ctx.buf["prev_reward"][:, :n].bernoulli_(0.1)
            ctx.cache.k[:, :, :, :n].normal_()
            ctx.cache.v[:, :, :, :n].normal_()
            ctx.length = ctx.cache.length = ctx.max_tokens = n
            return
        mem, nt = self.policy, self.cfg["n_transit"]

        def steps(count: int, seed: int) -> list[dict]:
            tokens = self._random_tokens(count, seed)
            return [{key: v[:, i:i + 1].clone() for key, v in tokens.items()} for i in range(count)]

        i = 0
        while True:  # fill the recent steps to n_transit and compress whenever step() would
            need = nt - len(mem.recent)
            if i + need >= n:  # the remaining steps fit without another compression
                break
            mem.recent.extend(steps(need, i))
            i += need
            mem._compress()  # what step() does before appending step i + 1
        for tok in steps(n - i, i):  # the last <= n_transit steps through the real step()
            mem.step(tok)

    def context_mb(self) -> float:
        if self.kind == "ad_full":
            return tensor_mb(self.ctx.cache.k, self.ctx.cache.v, *self.ctx.buf.values())
        mem = self.policy
        recent = [t for tok in mem.recent for t in tok.values()]
        return tensor_mb(mem.cache.k, mem.cache.v, mem.latents, *recent)

    def run(self) -> dict:
        import numpy as np
        import torch

        import env as envs
        from model.rollout import sample_actions
        from tokens import step_tokens
        if self.kind == "ad_full":  # rewind: every probe covers steps h - k + 1 .. h
            self.ctx.length = self.ctx.cache.length = self.h - self.k
        n_actions = envs.n_actions(self.cfg)
        prev_action, prev_reward = np.full(self.B, n_actions), np.zeros(self.B, dtype=np.float32)
        states, new_episode = self.env.reset(), np.ones(self.B, dtype=np.int64)
        sync(self.device)
        tic = time.perf_counter()
        with torch.no_grad():
            for t in range(self.k):  # the loop of model.rollout._rollout
                if t and t % self.cfg["horizon"] == 0:
                    states, new_episode = self.env.reset(), np.ones(self.B, dtype=np.int64)
                token = step_tokens(envs.state_token(self.cfg, states), prev_action, prev_reward, new_episode)
                logits = self.policy.step({key: torch.as_tensor(v, device=self.device)[:, None]
                                           for key, v in token.items()})
                actions = sample_actions(logits, self.rng.random(self.B), False)
                states, rewards, dones = self.env.step(actions)
                prev_action, prev_reward, new_episode = actions, rewards, dones.astype(np.int64)
        sync(self.device)
        return {"seconds": time.perf_counter() - tic}

    def finish(self) -> dict:
        peak, how = self.memory()
        out = {"peak_mem_mb": peak, "memory_measure": how, "context_mb": self.context_mb(),
               "max_context_tokens": self.ctx.max_tokens}
        if self.kind == "compressed":
            out["compression_depth"] = self.policy.depth
        return out


def _fit(xs, ys):
    """Least-squares line y = a + b x."""
    _n, mx, my = len(xs), statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def model_settings(cfg: dict) -> dict:
    keys = ("n_transit", "n_latent", "enc_n_layer", "max_compression_depth", "grad_compression_rounds",
            "tf_n_embd", "tf_n_layer", "tf_n_head", "state_embedding")
    return {k: cfg[k] for k in keys} | {"stage_len": cfg["n_transit"] // 2}


def part_ii(args) -> None:
    histories = [int(h) for h in args.histories.split(",")]
    settings = model_settings(compressed_cfg("cpu"))
    if not args.probe:
        sl = settings["stage_len"]
        args.probe = sl * -(-80 // sl)
    jobs = [(kind, h) for h in histories for kind in ("compressed", "ad_full")
            if kind == "compressed" or h <= args.max_ad_history]
    specs = [{"kind": kind, "history": h, "probe": args.probe, "goals": args.goals, "rollouts": args.rollouts,
              "device": args.device, "seed": args.seed} for kind, h in jobs]
    for s in specs:
        if s["history"] < s["probe"]:
            raise SystemExit(f"history {s['history']} is shorter than --probe {s['probe']}")
    workers = start_workers(__file__, specs, RolloutVariant, args.in_process)
    try:
        runs = {job: [] for job in jobs}
        for rep in range(args.reps):
            for job, w in zip(jobs, workers):  # interleaved: compressed h1, ad h1, compressed h2, ...
                r = w.call("run")
                runs[job].append(r)
                print(f"[(ii) rep {rep + 1}/{args.reps}] {job[0]} h={job[1]}: "
                      f"{r['seconds']:.2f} s / {args.probe} steps",
                      file=sys.stderr, flush=True)
        final = {job: w.call("finish") for job, w in zip(jobs, workers)}
    finally:
        for w in workers:
            w.kill()
    B = args.goals * args.rollouts
    rows = {}
    for job in jobs:
        kind, h = job
        f, sec = final[job], statistics.median(r["seconds"] for r in runs[job])
        rows[job] = {"bench": "compressed", "part": "ii_rollout", "model": kind, "history_steps": h,
                     "settings": settings if kind == "compressed" else {"n_transit": h, **{
                         k: settings[k] for k in ("tf_n_embd", "tf_n_layer", "tf_n_head", "state_embedding")}},
                     "method": "measured", "envs": B, "probe_steps": args.probe, "reps": args.reps,
                     "env_steps_per_s": round(B * args.probe / sec, 1),
                     "ms_per_step": round(1000 * sec / args.probe, 2),
                     "context_mb": round(f["context_mb"], 2),
                     "peak_mem_mb": None if args.in_process else round(f["peak_mem_mb"], 1),
                     "max_context_tokens": f["max_context_tokens"],
                     **({"compression_depth": f["compression_depth"]} if kind == "compressed" else {}),
                     "memory_measure": ("context_mb: KV cache + token buffers + latents (tensor sizes); peak_mem_mb: "
                                        + (IN_PROCESS_MEMORY if args.in_process else f["memory_measure"]))}
    measured_ad = sorted(h for kind, h in jobs if kind == "ad_full")
    for h in histories:
        if h > args.max_ad_history:
            if len(measured_ad) < 2:
                rows[("ad_full", h)] = {"bench": "compressed", "part": "ii_rollout", "model": "ad_full",
                                        "history_steps": h, "method": "skipped: extrapolating needs two "
                                        "measured AD histories (raise --max-ad-history)"}
                continue
            ms = _fit(measured_ad, [rows[("ad_full", x)]["ms_per_step"] for x in measured_ad])
            if ms[1] < 0:  # timing noise; attention cost does not fall with the context
                ms = (statistics.mean(rows[("ad_full", x)]["ms_per_step"] for x in measured_ad), 0.0)
            ctx = _fit(measured_ad, [rows[("ad_full", x)]["context_mb"] for x in measured_ad])
            row = {"bench": "compressed", "part": "ii_rollout", "model": "ad_full", "history_steps": h,
                   "method": f"extrapolated: linear fits over measured histories {measured_ad}", "envs": B,
                   "ms_per_step": round(ms[0] + ms[1] * h, 2),
                   "env_steps_per_s": round(1000 * B / (ms[0] + ms[1] * h), 1),
                   "context_mb": round(ctx[0] + ctx[1] * h, 2), "max_context_tokens": h}
            if not args.in_process:
                pk = _fit(measured_ad, [rows[("ad_full", x)]["peak_mem_mb"] for x in measured_ad])
                row["peak_mem_mb"] = round(pk[0] + pk[1] * h, 1)
            rows[("ad_full", h)] = row
    for h in histories:
        for kind in ("compressed", "ad_full"):
            if (kind, h) in rows:
                print(json.dumps(rows[(kind, h)]))
    ratios = {}
    for h in histories:
        c, a = rows.get(("compressed", h)), rows.get(("ad_full", h))
        if c and a and "env_steps_per_s" in a:
            r = {"speed_compressed/ad_full": round(c["env_steps_per_s"] / a["env_steps_per_s"], 2),
                 "context_mem_ad_full/compressed": round(a["context_mb"] / c["context_mb"], 1),
                 "ad_method": a["method"].split(":")[0]}
            if c.get("peak_mem_mb") and a.get("peak_mem_mb"):
                r["peak_mem_ad_full/compressed"] = round(a["peak_mem_mb"] / c["peak_mem_mb"], 2)
            ratios[str(h)] = r
    print(json.dumps({"bench": "compressed", "part": "ii_rollout", "ratios_by_history": ratios,
                      "of": "medians of interleaved probes; memory from the finished workers", "envs": B,
                      "probe_steps": args.probe}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--part", default="all", choices=("all", "i", "ii"))
    g = p.add_argument_group("(i) training")
    g.add_argument("--batch-size", type=int, default=32, help="samples per batch (train_batch_size of the config)")
    g.add_argument("--pool", type=int, default=6, help="BucketSampler batches per pass (the old way regroups "
                   "the same samples)")
    g.add_argument("--tasks", type=int, default=4, help="training tasks in the synthetic history file")
    g.add_argument("--warmup", type=int, default=1, help="untimed batches before timing")
    g.add_argument("--threads", type=int, default=1, help="torch threads for training (0 = torch default; "
                   "1 by default, see bench/train.py)")
    g = p.add_argument_group("(ii) rollouts")
    g.add_argument("--histories", default="1000,4000,16000", help="history lengths in steps")
    g.add_argument("--max-ad-history", type=int, default=16000,
                   help="full-context AD runs up to this history; longer ones are extrapolated")
    g.add_argument("--probe", type=int, default=0, help="timed rollout steps per repetition (0 = the "
                   "smallest multiple of CompressedAD's stage length >= 80)")
    g.add_argument("--goals", type=int, default=8, help="held-out goals")
    g.add_argument("--rollouts", type=int, default=1, help="rollouts per goal")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (passes / probes); medians")
    p.add_argument("--in-process", action="store_true", help="no worker processes (memory then not measured)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one rep, in-process")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        spec = json.loads(args._worker)
        serve(spec, RolloutVariant if "kind" in spec else BucketVariant)
        return
    if args.quick:
        args.batch_size, args.pool, args.tasks, args.reps, args.in_process = 4, 2, 1, 1, True
        args.histories, args.max_ad_history, args.probe, args.goals = "400,1000,2000", 1000, 40, 2
    if args.part in ("all", "i"):
        part_i(args)
    if args.part in ("all", "ii"):
        part_ii(args)


if __name__ == "__main__":
    main()
