"""Which mixed precision a run uses, decided from the GPU's compute capability rather than from emulation.

``torch.cuda.is_bf16_supported()`` answers True on pre-Ampere GPUs (V100, T4, RTX 20xx) because bf16 can be
emulated there, but cuDNN has no bf16 convolutions below compute capability 8.0: bf16 would run slowly.
"""

import torch

from vocseg.errors import UserError

CHOICES = ("auto", "bf16", "fp16", "off")
BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores


def amp_dtype(amp, device: torch.device, where: str = "the config") -> torch.dtype | None:
    """The autocast dtype for ``amp`` in {"auto", "bf16", "fp16", "off"} on ``device``; None means fp32."""
    amp = "off" if amp in (None, False) else amp
    if amp not in CHOICES:
        raise UserError(f"amp={amp!r} in {where} is not one of {', '.join(map(repr, CHOICES))}")
    if device.type != "cuda" or amp == "off":
        return None
    capability = tuple(torch.cuda.get_device_capability(device))
    if amp == "auto":
        amp = "bf16" if capability >= BF16_CAPABILITY else "fp16"
    if amp == "bf16" and capability < BF16_CAPABILITY:
        raise UserError(
            f"amp='bf16' in {where}: {torch.cuda.get_device_name(device)} (compute capability "
            f"{capability[0]}.{capability[1]}) has no bf16 tensor cores; set amp='fp16' or amp='auto'"
        )
    return torch.bfloat16 if amp == "bf16" else torch.float16


def describe(dtype: torch.dtype | None) -> str:
    """The line the log shows for the precision that runs."""
    if dtype is None:
        return "fp32"
    return "bf16 autocast" if dtype == torch.bfloat16 else "fp16 autocast with GradScaler"
