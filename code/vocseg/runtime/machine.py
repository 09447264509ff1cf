"""Process-wide settings of the machine: the device, seeds and the CPU allocator.

``VOCSEG_CPU_ALLOCATOR=default`` leaves glibc's allocator alone in CPU runs (see ``tune_cpu_allocator``).
"""

import ctypes
import os
import random
import sys

import ignite.distributed as idist
import numpy as np
import torch

from vocseg.errors import UserError


def choose_device(requested, where: str) -> torch.device:
    """The device this process computes on: the process group's own when there is one, else ``requested``.

    A CUDA device without a visible GPU is refused in one line that starts with ``where`` (the config or option
    that asked for it). On the CPU the allocator is tuned for repeated steps (``tune_cpu_allocator``).
    """
    device = idist.device() if idist.get_world_size() > 1 else torch.device(requested)
    if device.type == "cuda":
        check_gpu_visible(requested, where)
    if device.type == "cpu":
        tune_cpu_allocator()
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def tune_cpu_allocator() -> bool:
    """CPU training: let glibc keep freed autograd buffers for the next step instead of handing them back.

    By default it unmaps or trims those large blocks after every step and the next step page-faults them
    in again: 10-20k faults, 5-10% of a CPU step (benchmarks/trainer_overhead.py); PyTorch's CUDA allocator
    caches for the same reason. Memory stays at its peak, which the next step needs anyway. Applies to the
    whole process; ``VOCSEG_CPU_ALLOCATOR=default`` opts out. No-op without glibc. True when applied.
    """
    if os.environ.get("VOCSEG_CPU_ALLOCATOR", "") == "default" or not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum: blocks below it come from the reusable heap
    mallopt(m_trim_threshold, 2**31 - 1)
    mallopt(m_top_pad, 64 << 20)
    return True


def check_gpu_visible(requested, where: str) -> None:
    """Stop with one line when ``requested`` (a device setting) asks for CUDA and no GPU is visible: a GPU recipe
    must never train on the CPU for days by accident."""
    if str(requested or "").startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"{where}: device='{requested}' but no GPU is visible: set device='cpu' "
            "(CONFIG_OVERRIDES=device=cpu runs it on the CPU on purpose)"
        )
