"""Which input gate? Autoencoder candidates against the films and the negatives, the gate alone.

Each candidate is fitted on the train films (and, for outlier exposure, on generated images from
synth.py), its threshold set at the valid films' quantile. Then it scores: test (should pass), the
films from outside the training sources (chest films: should pass; tuberculosis may not), and the
negative set of stage `negatives` (should be refused or referred). "+rules" counts what the
existing not-an-X-ray rules (colour, blank) and the decode checks already refuse or refer.
Nothing is fitted on external/ or the negatives. Run from the repo root after `dvc repro negatives`:

    .venv/bin/python experiments/input_gate/gate_study.py [--only NAME ...]
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

from covid_cxr.model import synthneg as synth  # noqa: E402

BASE = {"code": 32, "width": 16, "epochs": 20, "batch_size": 64, "lr": 2e-3, "quantile": 0.99, "knn_k": 10,
        "latent": False, "outlier_exposure": 0.0, "oe_margin": 3.0}
CANDIDATES = {
    "ae": {},
    "ae q0.995": {"quantile": 0.995},
    "ae+latent": {"latent": True},
    "ae+oe": {"outlier_exposure": 1.0},
    "ae+latent+oe": {"latent": True, "outlier_exposure": 1.0},
    "ae+latent+oe q0.995": {"latent": True, "outlier_exposure": 1.0, "quantile": 0.995},
}


def sets(size: int):
    import pandas as pd

    from covid_cxr.config import Paths
    from covid_cxr.data.cache import decoded
    from covid_cxr.data.checkfilm import check_film
    from covid_cxr.data.preprocess import ImageError, resize_gray

    paths = Paths(ROOT)
    df = pd.read_csv(paths.manifest)
    cache = decoded(df, size, paths.root, paths.cache)
    split = {s: np.asarray(cache[np.flatnonzero(df["split"].to_numpy() == s)]) for s in ("train", "valid", "test")}

    def load(files):
        films, ruled, refused = [], [], 0
        for f in files:
            try:
                c = check_film(Path(f).read_bytes(), min_side=64, max_pixels=100_000_000)
            except ImageError:
                refused += 1
                continue
            films.append(resize_gray(c.gray, size))
            ruled.append(c.rule is not None)
        return np.stack(films) if films else np.zeros((0, size, size), np.uint8), np.array(ruled), refused

    ext = pd.read_csv(paths.root / "external" / "labels.csv")
    groups = {f"ext {g}": load([paths.root / "external" / f for f in ext[ext["group"] == g]["file"]])
              for g in sorted(ext["group"].unique())}
    neg = paths.artifacts / "negatives"
    with open(neg / "sources.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    kinds = sorted({r["subkind"] if r["kind"] == "medical" else r["kind"] for r in rows})
    for k in kinds:
        groups[f"neg {k}"] = load([neg / r["file"] for r in rows if (r["subkind"] if r["kind"] == "medical"
                                                                     else r["kind"]) == k])
    return split, groups


def main() -> None:
    import torch

    from covid_cxr.model.inputgate import fit_input_gate

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(2)
    split, groups = sets(224)
    names = [n for n in CANDIDATES if not a.only or n in a.only]
    head = ["candidate", "fit s", "valid", "test"] + list(groups)
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in names:
        settings = {**BASE, **CANDIDATES[name]}
        t0 = time.perf_counter()
        gate = fit_input_gate(split["train"], split["valid"], settings, seed=42,
                              negatives=lambda rng, n: synth.generate(rng, n, 64))
        fit_s = time.perf_counter() - t0
        cells = [name, f"{fit_s:.0f}"]
        for s in ("valid", "test"):
            cells.append(f"{100 * gate.flags(split[s])[1].mean():.1f} %")
        for g, (films, ruled, refused) in groups.items():
            flagged = gate.flags(films)[1] if len(films) else np.zeros(0, bool)
            n = len(films) + refused
            if g.startswith("neg"):   # refused or referred: the decode checks, the rules, or the gate
                cells.append(f"{100 * (refused + (flagged | ruled).sum()) / n:.1f} % ({n})")
            else:
                cells.append(f"{100 * flagged.mean():.1f} %")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
