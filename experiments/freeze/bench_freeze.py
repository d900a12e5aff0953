"""Fine-tuning cost by how much of the backbone stays frozen: img/s of forward + backward + AdamW step.

MobileNetV2, batch 32, channels_last, 2 threads, synthetic input (no data loading, no augmentation),
median of 5 timed steps after one warm-up. `body[:n]` frozen: 0 = all layers train; 7 = the lowest of
the four parameter groups (nets.py) frozen, as `unfreeze_groups: 3` does.

    .venv/bin/python experiments/freeze/bench_freeze.py
"""
from __future__ import annotations

import contextlib
import time

import torch

from covid_cxr.model.nets import build


def img_per_s(size: int, n_frozen: int, steps: int = 6, bs: int = 32, bf16: bool = False) -> float:
    """img/s of one training step; `bf16` runs forward and loss under CPU bfloat16 autocast (../bf16)."""
    net = build("mobilenet_v2", pretrained=True).to(memory_format=torch.channels_last)
    frozen = net.body[:n_frozen]
    for p in frozen.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], 1e-4)
    x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (bs,))
    net.train()
    frozen.eval()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = net(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    timed = sorted(times[1:])
    return bs / timed[len(timed) // 2]


def main() -> None:
    torch.set_num_threads(2)
    for size in (128, 192):
        for n_frozen in (0, 1, 2, 4, 7):
            print(f"size {size} px, body[:{n_frozen}] frozen: {img_per_s(size, n_frozen):6.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
