"""The precision the model answers in: float32, or bfloat16 where the CPU computes it natively.

params.yaml `serve.precision` (auto | float32 | bfloat16) is resolved here for the machine the model
runs on: `auto` is bfloat16 where the CPU has native bf16 dot products (AVX512-BF16 / AMX; without
them CPU autocast is slower than float32), else float32. Under bfloat16 the body runs in CPU
autocast; its early-layer statistics (the style taps, which the clean head and the novelty score
read) and everything after the body (heads, calibration, novelty, the input gate) stay float32.
bench/bench_bf16_parity.py measures that the answers agree with float32's.
"""
from __future__ import annotations

PRECISIONS = ("float32", "bfloat16")


def cpu_has_bf16() -> bool:
    """Native bfloat16 dot products (AVX512-BF16 / AMX)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(setting: str) -> str:
    """`auto` | `float32` | `bfloat16` -> the precision this machine runs: bfloat16 only where native."""
    if setting not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be auto, float32 or bfloat16, not {setting!r}")
    if setting == "float32":
        return "float32"
    return "bfloat16" if cpu_has_bf16() else "float32"


# The first body module that runs under bfloat16 autocast, per architecture: 0 is the whole body.
# (bench/bench_bf16_parity.py chose it: the agreement with float32's answers and the speed.)
BF16_FROM = {"mobilenet_v2": 0, "efficientnet_lite0": 0}


def bf16_start(arch: str) -> int:
    return BF16_FROM[arch]
