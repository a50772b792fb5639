"""Train an Algorithm Distillation transformer on collected learning histories.

Single process (CPU or one GPU, picked automatically):
    python train.py config/algorithm/ppo_darkroom.yaml config/env/darkroom.yaml config/model/ad_dr.yaml
Several GPUs or nodes (DDP; each process draws its own batches):
    torchrun --nproc_per_node=4 train.py <same configs>

The run goes to runs/{model}-{env}-seed{seed}/: resolved config.yaml, ckpt-last.pt and
TensorBoard events (train/, test/ and eval/ tags). Rerunning the same command resumes
from the checkpoint (model, optimiser, schedule, step, RNG) and ends with the same
parameters as a run that was never interrupted (on CPU).
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

import env as envs
from algorithm import history
from algorithm.history import dataset_path
from cli import check_training, config_arg_parser, load_config, run_cli, run_path
from config.loading import parse_set, read_yaml_mapping, save_config
from config.schema import KEYS_ADDED_LATER, SCHEMA, applies
from errors import UserError, first_line
from files import atomic_write, claim_run_dir, load_checkpoint, read_text
from model import build, memory_estimate, variant_of
from model.rollout import rollout
from runtime import check_memory, pick_device, seed_everything

# Keys that may differ when resuming: they change where and how fast, or how the run is
# evaluated, not what is learned.
RESUME_FREE_KEYS = tuple(k for k, spec in SCHEMA.items() if spec.section in ("evaluation", "run")) + (
    "num_workers", "log_interval", "test_interval", "eval_interval", "ckpt_interval", "n_process",
    "backend", "task_chunk", "data_cache_mb")


def lr_at(step: int, cfg: dict) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    warmup, total = cfg["warmup_steps"], cfg["train_timesteps"]
    if step < warmup:
        return cfg["lr"] * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def count_targets(targets: dict) -> int:
    return int((targets["action"] >= 0).sum())


def make_loaders(cfg: dict, rank: int, world: int, start: int, pin: bool):
    """Training and held-out loaders of (tokens, targets); batches depend only on (seed, rank, step). The
    held-out losses come from the training tasks' held-out streams, or with test_stream_ratio=0 (one
    stream per task) from the validation tasks."""
    variant, path, bs, workers = variant_of(cfg), dataset_path(cfg), cfg["train_batch_size"], cfg["num_workers"]
    train_set, test_set = (variant.dataset(path, cfg, part) for part in data_parts(cfg))
    train_batches = variant.batches(train_set, bs, cfg["seed"], rank, world, start, cfg["train_timesteps"])
    test_batches = variant.batches(test_set, bs, cfg["seed"] + 1, 0, 1, 0, 4)
    # own generator: iterating a DataLoader draws a seed, which must not shift the global
    # RNG (dropout) differently in a resumed run than in an uninterrupted one
    return (train_set,
            DataLoader(train_set, batch_sampler=train_batches, collate_fn=variant.collate, num_workers=workers,
                       pin_memory=pin, persistent_workers=workers > 0, generator=torch.Generator()),
            DataLoader(test_set, batch_sampler=test_batches, collate_fn=variant.collate, generator=torch.Generator()))


def data_parts(cfg: dict) -> tuple[str, str]:
    """The dataset parts a training reads: its windows, and the held-out ones of the test/ losses."""
    return "train", "test" if cfg["test_stream_ratio"] > 0 else "val"


def check_ready(cfg: dict, device):
    """Everything a training checks before it writes anything: the config's combinations that
    concern the data, the memory, the data file (its settings, split, tasks, streams and
    windows: the datasets are built once here and again, from the checked file, in
    make_loaders), and a run already in the folder. A refusal leaves no folder behind."""
    check_training(cfg)
    check_fits(cfg, device)
    for part in data_parts(cfg):
        variant_of(cfg).dataset(dataset_path(cfg), cfg, part)
    run_dir = run_path(cfg)
    if (run_dir / "ckpt-last.pt").exists():
        check_resumable(run_dir, cfg)
    previous_training(run_dir)


def run_differences(run_dir: Path, cfg: dict) -> list[str]:
    """'key=saved (now asked)' for the settings that change what the run in `run_dir` learned
    (its config.yaml against `cfg`): a run to resume, or to report under cfg's name."""
    try:
        saved = read_yaml_mapping(run_dir / "config.yaml", "run config")
    except UserError as e:
        raise UserError(f"{run_dir} holds a run but its config.yaml cannot be read ({e}); restore "
                        "config.yaml or move the run away") from None
    saved = KEYS_ADDED_LATER | saved
    free = RESUME_FREE_KEYS + variant_of(cfg).unused_keys(cfg) + tuple(k for k in SCHEMA if not applies(k, cfg))
    return [f"{k}={saved.get(k)!r} (now {cfg[k]!r})" for k in cfg if k not in free and saved.get(k) != cfg[k]]


def check_resumable(run_dir: Path, cfg: dict):
    diff = run_differences(run_dir, cfg)
    if diff:
        raise UserError(f"{run_dir} holds a run with other settings: {', '.join(diff)}; use those "
                        "settings to resume, another seed or run_dir, or move the run away")


CKPT_KEYS = ("model", "optimizer", "step", "torch_rng")


def save_checkpoint(path: Path, model, opt, step: int, device):
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":  # dropout on the GPU draws from the GPU's generator
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    with atomic_write(path) as f:  # a run killed while saving keeps the previous checkpoint
        torch.save(state, f)


def resume(ckpt: Path, model, opt, device) -> int:
    """Load model, optimiser and RNG from the checkpoint; the step to go on from."""
    # on the CPU first, as saved: load_state_dict moves the weights and Adam's moments to the
    # parameters' device and keeps Adam's step counts on the CPU, as in an uninterrupted run; the
    # generator states must be CPU byte tensors
    state = load_checkpoint(ckpt, "cpu", need=CKPT_KEYS)
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        elif device.type == "cuda":
            print(f"note: {ckpt} holds no GPU generator state (saved on a CPU or by an older version): "
                  "with dropout, the masks from here on differ from an uninterrupted run's")
        return int(state["step"])
    except Exception as e:  # noqa: BLE001 - the config matched, so the file's content is wrong
        raise UserError(f"cannot resume from {ckpt} ({first_line(e)}): the file is damaged; move it away "
                        "to start over") from None


def check_fits(cfg: dict, device):
    """Refuse sizes that cannot fit before building anything (the model is sized on the meta device)."""
    history.read_header(dataset_path(cfg))  # a missing dataset stops here, before any work
    parts = memory_estimate(cfg, envs.model_inputs(cfg), cfg["train_batch_size"], training=True)
    # (the data needs no share: windows are read from the file on demand, see dataset.py)
    check_memory("training", parts, device, "use a smaller tf_n_embd, tf_n_layer, n_transit or train_batch_size")


@torch.no_grad()
def test_losses(model, loader, device) -> dict:
    """Mean metrics over the held-out streams' batches."""
    model.eval()
    sums, n = {}, 0
    for tokens, targets in loader:
        tokens, targets = to_device(tokens, device), to_device(targets, device)
        with autocast(device):
            logits, _ = model(tokens)
            metrics = model.metrics(tokens, logits, targets)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    model.train()
    return {k: v / n for k, v in sums.items()}


def hardware(device, world: int) -> str:
    if device.type == "cuda":
        return f"{world} x {torch.cuda.get_device_name(device)}"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s) x {world} process(es)"


def peak_rss_mb() -> float:
    import resource  # Unix; ru_maxrss is in KiB on Linux, in bytes on macOS
    usage = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return max(usage) / (2**20 if sys.platform == "darwin" else 1024)


def record_training_time(run_dir: Path, steps: int, seconds: float, device, world: int):
    """train_summary.json: wall time summed over the sessions of a run (resumes add up)."""
    old = previous_training(run_dir)
    summary = {"steps": old["steps"] + steps, "seconds": old["seconds"] + seconds,
               "hardware": hardware(device, world),
               # this session's peak resident memory of this process and of its finished loader workers
               "peak_rss_mb": round(peak_rss_mb(), 1)}
    with atomic_write(run_dir / "train_summary.json", "w") as f:
        f.write(json.dumps(summary, indent=1))


def previous_training(run_dir: Path) -> dict:
    """train_summary.json of the sessions before this one (checked before training starts)."""
    path = run_dir / "train_summary.json"
    if not path.exists():
        return {"steps": 0, "seconds": 0.0}
    try:
        old = json.loads(read_text(path, "training summary"))
        return {"steps": int(old["steps"]), "seconds": float(old["seconds"])}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is damaged ({first_line(e)}); move it away (the run itself is fine)") from None


def setup_distributed(device: torch.device):
    """(rank, world size) under torchrun, else (0, 1). nccl only when the run trains on
    CUDA: a `device=cpu` run on a GPU box needs gloo (nccl cannot reduce CPU tensors)."""
    if "RANK" not in os.environ:
        return 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def train(cfg: dict):
    """Train the run of `cfg`; rank 0 holds the run directory meanwhile (see files.claim_run_dir)."""
    if int(os.environ.get("RANK", 0)) != 0:
        return _train(cfg)
    check_ready(cfg, pick_device(cfg["device"]))
    with claim_run_dir(run_path(cfg)):
        return _train(cfg)


def _train(cfg: dict):
    device, rank, world = prepare_process(cfg)
    seed_everything(cfg["seed"])
    model = build(cfg, envs.model_inputs(cfg)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                            betas=(0.9, 0.95))
    run_dir = run_path(cfg)
    ckpt = run_dir / "ckpt-last.pt"
    start = 0
    if ckpt.exists():
        check_resumable(run_dir, cfg)
        start = resume(ckpt, model, opt, device)
    if start >= cfg["train_timesteps"]:  # nothing to do: leave the run's files as they are
        print(f"{run_dir} already finished {start} steps; nothing to do (evaluate with python evaluate.py {run_dir})")
        return run_dir
    if rank == 0:
        previous_training(run_dir)  # a damaged summary stops here, not after the training
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    # DDP all-reduces gradients through hooks on forward(), so the loss goes through it
    ddp_model = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=variant_of(cfg).find_unused_parameters)
    train_set, loader, test_loader = make_loaders(cfg, rank, world, start, pin=device.type == "cuda")
    log = TrainingLog(cfg, run_dir, model, test_loader, device, world, start) if rank == 0 else None
    if log:
        log.announce(len(train_set), train_set.reading_hint())
    tic = time.perf_counter()
    step = start
    for tokens, targets in loader:
        tokens, targets = to_device(tokens, device), to_device(targets, device)
        lr, metrics = optimiser_step(cfg, model, ddp_model, opt, step, tokens, targets, device)
        step += 1
        if log:
            log.step(step, lr, metrics, count_targets(targets))
        if rank == 0 and (step % cfg["ckpt_interval"] == 0 or step == cfg["train_timesteps"]):
            save_checkpoint(ckpt, model, opt, step, device)
    if log:
        log.close()
        seconds = time.perf_counter() - tic
        record_training_time(run_dir, step - start, seconds, device, world)
        print(f"done: {step} steps in {seconds:.0f}s -> {ckpt}")
    if world > 1:
        dist.destroy_process_group()
    return run_dir


def prepare_process(cfg: dict) -> tuple[torch.device, int, int]:
    """(device, rank, world size) of this process; its CPU threads set."""
    device = pick_device(cfg["device"])
    rank, world = setup_distributed(device)
    if device.type == "cpu":
        torch.set_num_threads(cfg["cpu_threads"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device, rank, world


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU (float32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def optimiser_step(cfg, model, ddp_model, opt, step: int, tokens, targets, device) -> tuple[float, dict]:
    """One AdamW step at the schedule's learning rate: (lr, the batch's metrics)."""
    lr = lr_at(step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast(device):
        logits, loss = ddp_model(tokens, targets)
        metrics = model.metrics(tokens, logits, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    opt.step()
    return lr, metrics


class TrainingLog:
    """Rank 0's view of a training: the progress bar and the TensorBoard scalars (train/ every
    log_interval steps, test/ losses on held-out streams every test_interval, eval/ in-context
    returns on the validation tasks every eval_interval: never the test tasks)."""

    def __init__(self, cfg: dict, run_dir: Path, model, test_loader, device, world: int, start: int):
        from torch.utils.tensorboard import SummaryWriter
        self.cfg, self.run_dir, self.model, self.test_loader = cfg, run_dir, model, test_loader
        self.device, self.world, self.start = device, world, start
        self.writer = SummaryWriter(str(run_dir))
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(cfg, sort_keys=False) + "```", start)
        self.val_tasks = envs.tasks_of_split(cfg, "val")
        self.bar = tqdm(total=cfg["train_timesteps"], initial=start, unit="step", dynamic_ncols=True)
        self.tic, self.n_targets = time.perf_counter(), 0

    def announce(self, n_windows: int, hint: str):
        n_params = sum(p.numel() for p in self.model.parameters())
        print(f"{self.run_dir}: {n_params:,} parameters, {n_windows:,} training windows, device {self.device}, "
              f"world size {self.world}, steps {self.start}..{self.cfg['train_timesteps']}")
        if hint:
            print(hint)

    def due(self, step: int, interval: int) -> bool:
        return bool(interval) and (step % interval == 0 or step == self.cfg["train_timesteps"])

    def step(self, step: int, lr: float, metrics: dict, n_targets: int):
        cfg, writer = self.cfg, self.writer
        self.bar.update(1)
        self.n_targets += n_targets
        if self.due(step, cfg["log_interval"]):
            for k, v in metrics.items():
                writer.add_scalar(f"train/{k}", v, step)
            writer.add_scalar("train/lr", lr, step)
            rate = self.n_targets * self.world / (time.perf_counter() - self.tic)
            writer.add_scalar("train/targets_per_second", rate, step)
            self.bar.set_postfix(loss=f"{metrics['loss_action']:.3f}", acc=f"{metrics['acc_action']:.2f}")
        if self.due(step, cfg["test_interval"]):
            for k, v in test_losses(self.model, self.test_loader, self.device).items():
                writer.add_scalar(f"test/{k}", v, step)
        if self.val_tasks and self.due(step, cfg["eval_interval"]):
            returns, _ = rollout(self.model, cfg, self.val_tasks, n_episodes=min(cfg["eval_episodes"], 20),
                                 n_rollouts=1, seed=cfg["eval_seed"])
            writer.add_scalar("eval/return_first", float(returns[:, 0].mean()), step)
            writer.add_scalar("eval/return_final", float(returns[:, -1].mean()), step)

    def close(self):
        self.bar.close()
        self.writer.close()


def main():
    parser = config_arg_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args()
    if not args.configs:
        parser.error("give the algorithm, env and model config files (see the examples in --help)")
    cfg = load_config(args.configs, parse_set(args.set))
    train(cfg)


if __name__ == "__main__":
    run_cli(main)
