"""Which device and which numeric precision a run uses, when the recipe says ``auto``."""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16-lm", "bf16")
"""fp32; bf16-lm: fp32 but the LM's vocabulary projection (the costliest matmul) in bf16; bf16:
autocast everywhere; auto: the fastest of these that the hardware runs natively."""


def resolve_device(requested: str | None = "auto") -> torch.device:
    """``auto`` (or None): cuda when available, else cpu; anything else as given."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 is faster than fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` as a concrete precision for ``device``; others are checked and returned.

    auto: bf16 on a GPU that supports it; bf16-lm on a CPU with native bf16 (the LM's vocabulary
    projection is most of a tiny model's time, and is ~2x faster there); fp32 elsewhere (emulated
    bf16 is slower than fp32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu" and cpu_has_native_bf16():
        return "bf16-lm"
    return "fp32"
