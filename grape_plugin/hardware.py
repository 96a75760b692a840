"""What the hardware does well: whether this CPU runs bf16 natively (else bf16 is slower than fp32 on it)."""

from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger(__name__)

# x86 flags (AVX512-BF16, AMX-BF16) and the Arm feature (BF16 dot products) that give native bf16 matmuls
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags named on the ``flags`` (x86) and ``Features`` (Arm) lines of /proc/cpuinfo."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def native_bf16_cpu(cpuinfo: Optional[str] = None) -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16, AMX-BF16 or Arm BF16).

    ``cpuinfo`` is the text of /proc/cpuinfo (read when not given). Where there is none (not Linux), torch's
    oneDNN check decides. Without native bf16 a bf16 forward pass is emulated and runs several times slower
    than fp32 (about 5x for SmolLM2 on 2 AVX2 cores).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return _torch_says_bf16()
    return bool(cpu_flags(cpuinfo) & BF16_FLAGS)


def _torch_says_bf16() -> bool:
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (ImportError, AttributeError, RuntimeError):
        return False


def warn_if_slow_bf16(device: str, dtype: Any) -> bool:
    """Log a warning, and return True, when bf16 (``"bf16"`` or ``torch.bfloat16``) is asked for on a CPU
    without native bf16: it will run slower than fp32 there."""
    if not str(device).startswith("cpu") or str(dtype) not in ("bf16", "torch.bfloat16", "bfloat16"):
        return False
    if native_bf16_cpu():
        return False
    log.warning(
        "--dtype bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): it will be slower than fp32 "
        "(about 5x on AVX2); fp32 is the default on CPUs"
    )
    return True
