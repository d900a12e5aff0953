"""The answers in the precision a model ships in, against float32: how many change, and how much faster.

A model is fitted in the precision params.yaml `train.inference` chose (model.json `inference`:
bfloat16 from one body module on, where the training CPU has it natively; model/precision.py), and
served in it where the CPU has native bfloat16; a CPU without it serves float32. For a model
directory (default artifacts/model), every film of the test split, of external/ and of the negative
set (stage `negatives`) is answered by
  * float32, BatchNorm unfolded (CxrNet.embed: the reference),
  * float32 through nets.inference_body (BatchNorm folded, frozen: what a CPU without bf16 serves),
  * bfloat16 through nets.inference_body from module N (the model's own, or each `--bf16-from`),
and per set: label agreement with the reference, verdict agreement (the same verdict and reason),
the largest gap between two probabilities of a class, the ECE of each (labelled films) and the
refer rates. Then the bare body's throughput (batch 16, channels_last, all cores): float32,
bfloat16 autocast, and the folded bodies.

Target (issue "adopt bf16 only where labels and verdicts agree on >= 99.9 % of films"): the folded
float32 body agrees on >= 99.9 % of every set (folding is exact). A bfloat16 row below it is not a
pass/fail: a model fitted in bfloat16 is evaluated, gated and served in bfloat16, and its row says
how a CPU without bfloat16 would differ from it.

    .venv/bin/python bench/bench_bf16_parity.py [--model-dir DIR] [--bf16-from N ...]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_service import body_ips  # noqa: E402  (one timing of the bare body for both benches)

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


def main() -> None:
    import torch

    from covid_cxr.model.checkpoint import load_model
    from covid_cxr.model.nets import inference_body
    from covid_cxr.model.precision import cpu_has_bf16

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "model")
    ap.add_argument("--bf16-from", type=int, nargs="*", default=[],
                    help="other first bfloat16 body modules to compare (the model's own is always shown)")
    a = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = load_model(a.model_dir, precision="float32")
    own = model.meta["inference"]
    print(f"# {a.model_dir} | fitted in {own['precision']}"
          + (f" from body module {own['bf16_from']}" if own["bf16_from"] is not None else "")
          + f" | {threads} threads | native bf16: {cpu_has_bf16()}")
    sets = films(model, ROOT)
    model.body = model.net.embed                                  # the reference: float32, BatchNorm unfolded
    ref = {k: answers(model, imgs, rules) for k, (imgs, rules, _) in sets.items()}
    starts = sorted({*a.bf16_from, *([own["bf16_from"]] if own["bf16_from"] is not None else [])})
    rows = [("float32, BatchNorm folded", None)] + [(f"bfloat16 from body module {n}"
                                                      + (" (the model's own)" if n == own["bf16_from"] else ""), n)
                                                     for n in starts]
    met = True
    for name, start in rows:
        model.body = inference_body(model.net, start, model.size, model.channels_last)
        print(f"\n## {name}, against float32 unfolded")
        print("| set | films | label agreement | verdict agreement | largest probability gap | ECE f32 / this "
              "| referred f32 / this |")
        print("|---|---|---|---|---|---|---|")
        for k, (imgs, rules, y) in sets.items():
            r, b = ref[k], answers(model, imgs, rules)
            lab = float(np.mean(r.probs.argmax(1) == b.probs.argmax(1)))
            ver = float(np.mean([(v1, r1) == (v2, r2) for v1, r1, v2, r2 in zip(r.verdict, r.reason, b.verdict,
                                                                                  b.reason)]))
            gap = float(np.abs(r.probs - b.probs).max())
            e = "—" if y is None else f"{ece(r.probs, y):.4f} / {ece(b.probs, y):.4f}"
            ref_r = np.mean([v == "refer" for v in r.verdict])
            bf_r = np.mean([v == "refer" for v in b.verdict])
            if start is None:
                met &= lab >= TARGET and ver >= TARGET
            print(f"| {k} | {len(imgs)} | {100 * lab:.2f} % | {100 * ver:.2f} % | {gap:.4f} | {e} "
                  f"| {100 * ref_r:.1f} % / {100 * bf_r:.1f} % |")
    variants = ["float32", "float32 folded"] + (["bfloat16 autocast", "bfloat16 folded"] if cpu_has_bf16() else [])
    ips = {v: body_ips(model.net, model.size, v, reps=12) for v in variants}
    print(f"\nbare body at {model.size} px, batch 16, {threads} threads: "
          + ", ".join(f"{v} {x:.1f} img/s" for v, x in ips.items()))
    if "bfloat16 autocast" in ips:
        print(f"bfloat16 / float32: autocast x{ips['bfloat16 autocast'] / ips['float32']:.2f}, "
              f"folded x{ips['bfloat16 folded'] / ips['float32 folded']:.2f}")
    print(f"target: the folded float32 body agrees with float32 on >= {100 * TARGET:.1f} % of labels and "
          f"verdicts of every set  {'MET' if met else 'NOT MET'}")


if __name__ == "__main__":
    main()
