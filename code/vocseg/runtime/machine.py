"""Process-wide settings of the machine: seeds and the CPU allocator (the device: vocseg.runtime.device_plan).

``VOCSEG_CPU_ALLOCATOR=default`` leaves glibc's allocator alone in CPU runs (see ``tune_cpu_allocator``).
"""

import ctypes
import os
import random
import sys

import numpy as np
import torch


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
