"""Fine-tuning and inference speed with bfloat16 autocast on the CPU, against float32.

MobileNetV2, every layer training, batch 32, channels_last, 2 threads, synthetic input (no data
loading, no augmentation), median of the timed steps after one warm-up. bfloat16 runs only where
the CPU has native bf16 dot products (AVX512-BF16 or AMX); elsewhere it is slower than float32.

    .venv/bin/python experiments/bf16/bench_bf16.py
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

from covid_cxr.model.nets import build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "freeze"))
from bench_freeze import img_per_s  # noqa: E402  (the same timed training step, every layer training)


def _median(times: list[float]) -> float:
    timed = sorted(times[1:])
    return timed[len(timed) // 2]


def infer_img_per_s(size: int, bf16: bool, steps: int = 6, bs: int = 64) -> float:
    net = build("mobilenet_v2", pretrained=True).to(memory_format=torch.channels_last).eval()
    x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            t = time.perf_counter()
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                net(x)
            times.append(time.perf_counter() - t)
    return bs / _median(times)


def main() -> None:
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, bf16 supported by oneDNN: "
          f"{torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    for size in (128, 160, 192, 224):
        f32, b16 = img_per_s(size, 0, steps=10), img_per_s(size, 0, steps=10, bf16=True)
        print(f"train  {size} px: float32 {f32:6.1f} img/s   bf16 autocast {b16:6.1f} img/s   x{b16 / f32:.2f}",
              flush=True)
    for size in (192, 224):
        f32, b16 = infer_img_per_s(size, False), infer_img_per_s(size, True)
        print(f"infer  {size} px: float32 {f32:6.1f} img/s   bf16 autocast {b16:6.1f} img/s   x{b16 / f32:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
