"""The precision a model answers in: chosen at training time, recorded in model.json, served as fitted.

params.yaml `train.inference: {precision, bf16_from}` sets it when the model is trained:
`bfloat16` runs the body from module `bf16_from` on in bfloat16 (nets.InferenceBody), `auto` is
bfloat16 where the training CPU computes it natively (AVX512-BF16 / AMX) and float32 elsewhere.
The temperature, both heads, the novelty model and every refer threshold are then fitted on that
body's output, and model.json records it as `inference: {precision, bf16_from}`: the gate judged
exactly the answers the model gives.

Serving (params.yaml `serve.precision`): `auto` answers in the model's precision where the CPU has
native bfloat16, and in float32 where it does not (a CPU without it computes bfloat16 slowly);
`float32` forces float32. A bfloat16 model served in float32 gives answers that differ from the
evaluated ones only for films near a threshold (bench/bench_bf16_parity.py measures how many).
"""
from __future__ import annotations

from typing import Any

PRECISIONS = ("float32", "bfloat16")
SERVE_PRECISIONS = ("auto", "float32")   # params.yaml serve.precision (release/bentoargs.py checks it)


def cpu_has_bf16() -> bool:
    """Native bfloat16 dot products (AVX512-BF16 / AMX)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fit_inference(setting: dict[str, Any]) -> dict[str, Any]:
    """params.yaml `train.inference` -> model.json `inference` for this machine."""
    precision, start = str(setting["precision"]), setting["bf16_from"]
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"train.inference.precision must be auto, float32 or bfloat16, not {precision!r}")
    if precision == "auto":
        precision = "bfloat16" if cpu_has_bf16() else "float32"
    if precision == "float32":
        return {"precision": "float32", "bf16_from": None}
    return {"precision": "bfloat16", "bf16_from": int(start)}


def serve_precision(inference: dict[str, Any], setting: str) -> str:
    """The precision to serve a model in (model.json `inference`, params.yaml `serve.precision`)."""
    if setting not in SERVE_PRECISIONS:
        raise ValueError(f"serve.precision must be one of {SERVE_PRECISIONS}, not {setting!r}")
    if setting == "float32" or inference["precision"] == "float32":
        return "float32"
    return "bfloat16" if cpu_has_bf16() else "float32"
