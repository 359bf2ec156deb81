"""Which autocast precision a device gets: bf16 where it multiplies bf16 natively, fp32 elsewhere.

Training and feature extraction share the rule, so ``precision: auto`` means one thing everywhere: CUDA
and CPUs with AMX or AVX512-BF16 (there oneDNN runs bf16 matrix products 2-4x faster than fp32) get
bf16 autocast; other CPUs, where bf16 would be emulated and slower, and other devices keep fp32.
Losses are computed in fp32 either way (``sslbench.losses.precision``).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16")

# torch's CPU feature probes are private and were renamed across versions (torch 2.4 has the AMX one as
# _is_cpu_support_amx_tile); a probe this torch lacks reads as "absent", so auto falls back to fp32.
_CPU_BF16_PROBES = (
    ("AMX", "_is_amx_tile_supported"),
    ("AMX", "_is_cpu_support_amx_tile"),
    ("AVX512-BF16", "_is_avx512_bf16_supported"),
)


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 matrix instructions (``"AMX"`` or ``"AVX512-BF16"``), None without any."""
    for name, probe in _CPU_BF16_PROBES:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return name
    return None


def precision_choice(requested: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) for a ``requested`` precision in ``PRECISIONS`` on ``device``."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested, "set in the config"
    if device.type == "cuda":
        return "bf16", "auto: CUDA"
    units = cpu_bf16_units() if device.type == "cpu" else None
    if units is not None:
        return "bf16", f"auto: the CPU has {units}"
    return "fp32", f"auto: no native bf16 matrix units on this {device.type}"


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (``fp32`` or ``bf16``) on ``device``: fp32 turns an
    enclosing autocast off, so it means fp32 wherever it is entered."""
    if precision == "fp32":
        return without_autocast(device.type)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for what must stay fp32 under an enclosing one (pixels, logits of a sharp softmax);
    a device without autocast (e.g. meta) gets no context."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()
