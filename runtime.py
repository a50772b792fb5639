"""What a command needs from the machine: a device, seeded generators, a memory check before
large work, and worker processes that end with their parent.
"""
import multiprocessing
import multiprocessing.connection
import os
import random
import threading

import numpy as np

from errors import ConfigError, UserError


def available_memory(device) -> int:
    """Free host memory in bytes, and the smaller of it and free GPU memory on CUDA."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        host = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if getattr(device, "type", device) == "cuda":
        import torch
        return min(host, torch.cuda.mem_get_info(device)[0])
    return host


def check_memory(what: str, parts: dict, device, hint: str):
    """Refuse up front a size whose estimated memory (bytes by part) exceeds what is free:
    otherwise it runs until the allocator or the kernel's OOM killer stops it, or it swaps."""
    need, have = sum(parts.values()), available_memory(device)
    if need > have:
        gb = lambda b: f"{b / 1e9:,.1f} GB"  # noqa: E731
        detail = ", ".join(f"{k} {gb(v)}" for k, v in parts.items())
        raise UserError(f"{what} needs about {gb(need)} of memory ({detail}) but {gb(have)} is free; {hint}")


# ----------------------------------------------------------------------------- processes

def exit_with_parent():
    """Call first in a worker process: exit as soon as the parent process is gone. A parent
    killed with kill -9 runs no cleanup, and an orphaned worker would go on computing and
    holding its memory for minutes. The sentinel is a pipe that closes when the parent dies."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


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
