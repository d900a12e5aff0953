"""bfloat16 inference against float32: the same answers, and how much faster.

For a model directory (default artifacts/model), every film of the test split, of external/ and of
the negative set (stage `negatives`) is answered twice, in float32 and in bfloat16 (CPU autocast over
the body from module `--bf16-from`; heads, calibration, novelty and the input gate stay float32).
Per set: label agreement, verdict agreement (the same verdict and reason), the largest gap between
the two probabilities of a class, the ECE of each (labelled films) and the refer rates. Then the
bare body's throughput (MobileNetV2 at the model's size, batch 16, channels_last, all cores) in
float32 and in bfloat16, and their ratio.

Target (issue: "adopt bf16 only where labels and verdicts agree on >= 99.9 % of films"): label and
verdict agreement >= 99.9 % on every set.

    .venv/bin/python bench/bench_bf16_parity.py [--model-dir DIR] [--bf16-from N ...]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TARGET = 0.999


def films(model, root: Path) -> dict[str, tuple[np.ndarray, list, np.ndarray | None]]:
    """set -> (model-size films, not-an-X-ray rules, labels or None)."""
    import pandas as pd

    from covid_cxr.config import CLASSES, Paths
    from covid_cxr.data.cache import decoded
    from covid_cxr.data.checkfilm import check_film
    from covid_cxr.data.preprocess import ImageError, resize_gray

    paths = Paths(root)
    df = pd.read_csv(paths.manifest)
    test = df[df["split"] == "test"].reset_index(drop=True)
    out = {"test": (np.asarray(decoded(test, model.size, paths.root, paths.cache)), [None] * len(test),
                    test["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy())}

    def load(files):
        imgs, rules = [], []
        for f in files:
            try:
                c = check_film(Path(f).read_bytes(), min_side=model.min_side, max_pixels=100_000_000)
            except ImageError:
                continue
            imgs.append(resize_gray(c.gray, model.size))
            rules.append(c.rule)
        return np.stack(imgs), rules

    ext = pd.read_csv(paths.root / "external" / "labels.csv")
    imgs, rules = load([paths.root / "external" / f for f in ext["file"]])
    lab = np.array([CLASSES.index(x) if x in CLASSES else -1 for x in ext["label"]])
    out["external"] = (imgs, rules, lab)
    neg = paths.artifacts / "negatives"
    if (neg / "sources.csv").is_file():
        with open(neg / "sources.csv", newline="") as fh:
            imgs, rules = load([neg / r["file"] for r in csv.DictReader(fh)])
        out["negatives"] = (imgs, rules, None)
    return out


def answers(model, imgs, rules):
    from covid_cxr.evaluation.scoring import concat

    return concat([model.predict(imgs[i:i + 32], not_xray=rules[i:i + 32]) for i in range(0, len(imgs), 32)])


def ece(probs: np.ndarray, y: np.ndarray) -> float | None:
    from covid_cxr.evaluation.metrics import ece as _ece

    keep = y >= 0
    return None if not keep.any() else float(_ece(probs[keep], y[keep], 15))


def body_ips(net, size: int, bf16: bool, threads: int, reps: int = 12) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.randn(16, 3, size, size).contiguous(memory_format=torch.channels_last)
    body = net.body
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), ctx:
        for _ in range(3):
            body(x)
        t = time.perf_counter()
        for _ in range(reps):
            body(x)
    return reps * 16 / (time.perf_counter() - t)


def main() -> None:
    import torch

    from covid_cxr.model.checkpoint import load_model
    from covid_cxr.model.precision import cpu_has_bf16

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "model")
    ap.add_argument("--bf16-from", type=int, nargs="*", default=[0],
                    help="the first body module under bf16 (0: all; the last style tap + 1 keeps the style exact)")
    a = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"# {a.model_dir} | {threads} threads | native bf16: {cpu_has_bf16()}")
    f32 = load_model(a.model_dir)
    sets = films(f32, ROOT)
    ref = {k: answers(f32, imgs, rules) for k, (imgs, rules, _) in sets.items()}
    met = True
    from dataclasses import fields

    from covid_cxr.model.checkpoint import LoadedModel

    for start in a.bf16_from:
        class Split(LoadedModel):                                  # the split under test
            bf16_from = start

        m = Split(**{fl.name: getattr(f32, fl.name) for fl in fields(f32)})
        m.precision = "bfloat16"
        print(f"\n## bfloat16 from body module {start}")
        print("| set | films | label agreement | verdict agreement | largest probability gap | ECE f32 / bf16 "
              "| referred f32 / bf16 |")
        print("|---|---|---|---|---|---|---|")
        for k, (imgs, rules, y) in sets.items():
            r, b = ref[k], answers(m, imgs, rules)
            lab = float(np.mean(r.probs.argmax(1) == b.probs.argmax(1)))
            ver = float(np.mean([(v1, r1) == (v2, r2) for v1, r1, v2, r2 in zip(r.verdict, r.reason, b.verdict,
                                                                                  b.reason)]))
            gap = float(np.abs(r.probs - b.probs).max())
            e = "—" if y is None else f"{ece(r.probs, y):.4f} / {ece(b.probs, y):.4f}"
            ref_r = np.mean([v == "refer" for v in r.verdict])
            bf_r = np.mean([v == "refer" for v in b.verdict])
            met &= lab >= TARGET and ver >= TARGET
            print(f"| {k} | {len(imgs)} | {100 * lab:.2f} % | {100 * ver:.2f} % | {gap:.4f} | {e} "
                  f"| {100 * ref_r:.1f} % / {100 * bf_r:.1f} % |")
    net = f32.net
    f, b = body_ips(net, f32.size, False, threads), body_ips(net, f32.size, True, threads)
    print(f"\nbare body at {f32.size} px, batch 16, {threads} threads: float32 {f:.1f} img/s, bfloat16 {b:.1f} img/s "
          f"(x{b / f:.2f})")
    print(f"target: label and verdict agreement >= {100 * TARGET:.1f} % on every set  measured: "
          f"{'all sets' if met else 'not every set'}  {'MET' if met else 'NOT MET'}")


if __name__ == "__main__":
    main()
