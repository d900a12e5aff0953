"""Two trained models together: does a clean-trained and an acquisition-augmented model beat the frontier?

The acquisition ablation (experiments/recipes/README.md) found one frontier: a model trained on clean films scores
the test split well (0.985) and the unseen hospital badly; an augmented one the other way round.
This asks whether a pair does better than either, under three rules:
- `mean`: the mean of the two models' calibrated probabilities; refer when either model refers;
- `mean+disagree`: the same, and refer when the two models' labels differ (reason: models disagree);
- `clean+disagree`: the clean model's probabilities; refer when either refers or they disagree;
- `mean, joint`: the mean, under one refer policy fitted on valid as `train` fits one model's:
  novelty = the larger of the members' novelty margins (score minus the member's own threshold),
  thresholded at the valid `verdict.novelty_quantile`; low confidence at the valid
  `verdict.low_confidence_quantile` of the mean's top probability.
Each model's own verdict is the one fitted on valid at its training time; nothing here reads
`external/` except to score it.

    .venv/bin/python experiments/ensemble/ood_ensemble.py .cache/experiments/cpu-acq-off-2026-12-03/model \
        .cache/experiments/cpu-acq-p0.25-2026-12-03/model
"""
from __future__ import annotations

import argparse
import sys
import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from covid_cxr.config import CLASSES, Paths, load_params
from covid_cxr.data.cache import decoded
from covid_cxr.evaluation.scoring import load_film
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.verdict import fit_min_confidence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))  # oodtable
from oodtable import HEADER, external_labels, row  # noqa: E402


def outputs(model_dir: Path, paths: Paths, sets: dict[str, Callable]) -> dict[str, np.ndarray]:
    """Calibrated probabilities and refer flags of one model per set (cached by weights hash)."""
    key = hashlib.sha1((model_dir / "model.safetensors").read_bytes()).hexdigest()[:12]
    cache = paths.root / ".cache" / "ensemble" / f"{key}-v2.npz"
    if cache.exists():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    model, out = load_model(model_dir), {}
    for name, films in sets.items():
        imgs, rules = films(model.size)   # rules: the not-an-X-ray rule each film fails, as the service applies
        probs, refer, margin = [], [], []
        for i in range(0, len(imgs), 64):
            p = model.predict(np.asarray(imgs[i:i + 64]), rules[i:i + 64])
            probs.append(p.probs)
            refer.append(np.array([v == "refer" for v in p.verdict]))
            margin.append(p.novelty - model.ood.threshold)
        out[f"{name}/probs"], out[f"{name}/refer"] = np.concatenate(probs), np.concatenate(refer)
        out[f"{name}/margin"] = np.concatenate(margin)
        print(f"  {model_dir.parent.name}: {name} scored", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clean", type=Path, help="model trained without acquisition ops")
    ap.add_argument("robust", type=Path, help="model trained with them")
    args = ap.parse_args()
    paths = Paths()
    params = load_params(paths.root / "params.yaml")
    confident = float(params["external"]["confident"])
    q, lq = float(params["verdict"]["novelty_quantile"]), float(params["verdict"]["low_confidence_quantile"])
    df = pd.read_csv(paths.manifest)
    ext = pd.read_csv(paths.root / "external" / "labels.csv")
    groups = sorted(ext["group"].unique())
    sets, ys = {}, {}
    for s in ("valid", "test"):
        d = df[df["split"] == s].reset_index(drop=True)
        # manifest films passed data check's not-an-X-ray rules in `prepare`
        sets[s] = lambda size, d=d: (decoded(d, size, paths.root, paths.cache), [None] * len(d))
        ys[s] = d["label"].map(CLASSES.index).to_numpy()
    for g in groups:
        files = list(ext[ext["group"] == g]["file"])
        def films(size, files=files):
            loaded = [load_film(paths.root / "external" / f, size, 64) for f in files]
            return np.stack([g for g, _ in loaded]), [rule for _, rule in loaded]
        sets[g] = films
    ys.update(external_labels(ext, groups))
    a, b = outputs(args.clean, paths, sets), outputs(args.robust, paths, sets)

    novel = {s: np.maximum(a[f"{s}/margin"], b[f"{s}/margin"]) for s in sets}
    thr = float(np.quantile(novel["valid"], q))
    min_conf = fit_min_confidence((a["valid/probs"] + b["valid/probs"]) / 2, lq)

    def rule(name: str, s: str) -> tuple[np.ndarray, np.ndarray]:
        pa, pb, ra, rb = a[f"{s}/probs"], b[f"{s}/probs"], a[f"{s}/refer"], b[f"{s}/refer"]
        disagree = pa.argmax(1) != pb.argmax(1)
        return {"clean": (pa, ra), "robust": (pb, rb), "mean": ((pa + pb) / 2, ra | rb),
                "mean+disagree": ((pa + pb) / 2, ra | rb | disagree),
                "clean+disagree": (pa, ra | rb | disagree),
                "mean, joint": ((pa + pb) / 2, (novel[s] > thr) | (((pa + pb) / 2).max(1) < min_conf))}[name]

    print(f"clean {args.clean}\nrobust {args.robust}")
    print(HEADER)
    for name in ("clean", "robust", "mean", "mean+disagree", "clean+disagree", "mean, joint"):
        print(row(name, rule, sets, ys, confident), flush=True)


if __name__ == "__main__":
    main()
