"""A machine with GPUs that do not exist, for the device-plan tests (tests/test_device_plan.py).

Put this folder first on PYTHONPATH and set VOCSEG_FAKE_GPUS="COUNT" or "COUNT:MAJOR.MINOR" (compute
capability, default 8.0): every Python process of the run then sees COUNT GPUs through torch.cuda's queries,
narrowed by CUDA_VISIBLE_DEVICES as the driver narrows them. Anything that would use one (initialising CUDA,
setting or asking the current device, a tensor on "cuda", synchronising, memory statistics) appends a line to
VOCSEG_FAKE_GPUS_LOG and raises: a run planned on the CPU must never get there.
"""

import os

import torch

_count, _, _capability = os.environ.get("VOCSEG_FAKE_GPUS", "0").partition(":")
_CAPABILITY = tuple(int(x) for x in (_capability or "8.0").split("."))


def _visible() -> int:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return int(_count)
    # The driver stops at the first entry that names no device; an empty list hides them all.
    return len([d for d in listed.split(",") if d.strip() and int(d) < int(_count)])


def _touched(name):
    def touch(*args, **kwargs):
        with open(os.environ.get("VOCSEG_FAKE_GPUS_LOG", os.devnull), "a") as log:
            log.write(f"{os.getpid()} torch.cuda.{name}\n")
        raise RuntimeError(f"fake GPU touched: torch.cuda.{name}")

    return touch


class _Properties:
    def __init__(self, index):
        self.name = f"Fake GPU {index}"
        self.major, self.minor = _CAPABILITY
        self.total_memory = 80 * 2**30


def _checked(index):
    index = index.index if isinstance(index, torch.device) else int(index or 0)
    if index >= _visible():
        raise RuntimeError("CUDA error: invalid device ordinal")
    return index


if int(_count):
    torch.cuda.is_available = lambda: _visible() > 0
    torch.cuda.device_count = _visible
    torch.cuda.get_device_capability = lambda device=None: (_checked(device), _CAPABILITY)[1]
    torch.cuda.get_device_name = lambda device=None: f"Fake GPU {_checked(device)}"
    torch.cuda.get_device_properties = lambda device=None: _Properties(_checked(device))
    for _name in (
        "_lazy_init",
        "init",
        "set_device",
        "current_device",
        "synchronize",
        "max_memory_allocated",
        "max_memory_reserved",
        "reset_peak_memory_stats",
        "mem_get_info",
    ):
        setattr(torch.cuda, _name, _touched(_name))
