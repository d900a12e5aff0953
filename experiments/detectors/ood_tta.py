"""Does test-time augmentation expose films the model should not be sure about?

For a model directory: each film is also scored under K acquisition-style re-processings
(augment.Acquisition with fixed seeds). Candidate scores: 1 - mean top-class probability over
the K+1 views, and the share of views whose label differs from the plain one. Thresholds are
the valid quantile `--quantile`; test and external films are only scored.

    .venv/bin/python experiments/detectors/ood_tta.py .cache/experiments/acq+ls0.1/model --k 4
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from covid_cxr.model.augment import Acquisition
from covid_cxr.config import Paths
from covid_cxr.data.cache import decoded
from covid_cxr.model.checkpoint import load_model
from covid_cxr.evaluation.scoring import load_film


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--p", type=float, default=0.5, help="probability of each acquisition op per view")
    args = ap.parse_args()
    paths = Paths()
    model = load_model(args.model_dir)
    cfg = yaml.safe_load((paths.root / "params.yaml").read_text())["train"]["augment"]["acquisition"]
    acq = Acquisition({k: dict(v, p=args.p) for k, v in cfg.items() if k not in ("border", "marker")})
    df = pd.read_csv(paths.manifest)
    sets = {s: decoded(df[df["split"] == s].reset_index(drop=True), model.size, paths.root, paths.cache)
            for s in ("valid", "test")}
    ext = pd.read_csv(paths.root / "external" / "labels.csv")
    for g in sorted(ext["group"].unique()):
        sets[g] = np.stack([load_film(paths.root / "external" / f, model.size, model.min_side)[0] for f in ext[ext["group"] == g]["file"]])
    scores = {}
    for name, imgs in sets.items():
        imgs = np.asarray(imgs)
        views = [imgs] + [np.stack([acq(g, np.random.default_rng(1000 * v + i)) for i, g in enumerate(imgs)])
                          for v in range(args.k)]
        probs = np.stack([np.concatenate([model.predict(x[i:i + 64]).probs for i in range(0, len(x), 64)])
                          for x in views])                      # (K+1, N, C)
        top = probs[0].argmax(1)
        mean_top = probs.mean(0)[np.arange(len(top)), top]
        flips = (probs.argmax(2) != top[None]).mean(0)
        scores[name] = {"1-mean top p": 1 - mean_top, "label flips": flips + 1e-3 * (1 - mean_top),
                        "1-plain top p": 1 - probs[0].max(1)}
    for q in (0.99, 0.98, 0.97):
        for kind in scores["valid"]:
            t = np.quantile(scores["valid"][kind], q)
            row = " | ".join(f"{k} {100 * (v[kind] > t).mean():5.1f}" for k, v in scores.items() if k != "valid")
            print(f"q{q} {kind:<14} | {row}")


if __name__ == "__main__":
    main()
