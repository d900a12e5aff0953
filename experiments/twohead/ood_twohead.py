"""A second head on the same body: does a head fitted on clean train films recover the test split
that acquisition augmentation gives up, at the cost of one linear layer instead of a second model?

The augmented model's body is kept as it is. On its pooled features of the *unaugmented* train
films (the features `train` already computes for the novelty bank) a multinomial logistic
regression is fitted; its L2 strength and temperature are chosen on valid by NLL. Rules:
- `model`: the trained head and its own refer policy (as shipped);
- `clean head`: the new head's probabilities, with the model's novelty refer and a low-confidence
  threshold refitted on valid;
- `mean`: the mean of both heads' calibrated probabilities, same refer rule;
- `mean+disagree`: and refer when the heads' labels differ.
Nothing reads `external/` except to score it.

    .venv/bin/python experiments/twohead/ood_twohead.py .cache/experiments/cpu-acq-p0.25-2026-12-03/model
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covid_cxr.config import CLASSES, Paths, load_params
from covid_cxr.data.cache import decoded
from covid_cxr.evaluation.scoring import load_film
from covid_cxr.model.calibration import fit_temperature
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.cleanhead import fit_clean_head
from covid_cxr.model.verdict import fit_min_confidence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))  # oodtable
from oodtable import HEADER, cached_sets, external_labels, row  # noqa: E402


def run(model, imgs, rules) -> dict[str, np.ndarray]:
    out = {"feats": [], "style": [], "probs": [], "novel": []}
    for i in range(0, len(imgs), 64):
        batch = np.asarray(imgs[i:i + 64])
        p = model.predict(batch, rules[i:i + 64] if rules is not None else None)
        _, feats, style = model.forward(batch)
        out["feats"].append(feats.float().numpy())
        out["style"].append(style.float().numpy())
        out["probs"].append(p.probs)
        out["novel"].append(p.novel | np.array([bool(r) for r in (rules[i:i + 64] if rules is not None
                                                                   else [None] * len(batch))]))
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--features", default="feats", help="feats | style | feats+style: what the clean head reads")
    ap.add_argument("--l2", help="the L2 grid, comma-separated (default: params.yaml train.clean_head.l2)")
    args = ap.parse_args()
    paths = Paths()
    params = load_params(paths.root / "params.yaml")
    confident = float(params["external"]["confident"])
    lq = float(params["verdict"]["low_confidence_quantile"])
    grid = [float(v) for v in args.l2.split(",")] if args.l2 else list(params["train"]["clean_head"]["l2"])
    model = load_model(args.model_dir)
    model.clean = None      # a pipeline model ships a clean head already: study the trained head's body alone
    df = pd.read_csv(paths.manifest)
    ext = pd.read_csv(paths.root / "external" / "labels.csv")
    groups = sorted(ext["group"].unique())
    ys = {s: df[df["split"] == s]["label"].map(CLASSES.index).to_numpy() for s in ("train", "valid", "test")}
    ys.update(external_labels(ext, groups))

    def compute():
        sets = {}
        for s in ("train", "valid", "test"):
            d = df[df["split"] == s].reset_index(drop=True)
            sets[s] = run(model, decoded(d, model.size, paths.root, paths.cache), None)
            print(f"  {s} scored", flush=True)
        for g in groups:   # with each film's not-an-X-ray rule, as uploads are answered
            loaded = [load_film(paths.root / "external" / f, model.size, model.min_side) for f in ext[ext["group"] == g]["file"]]
            sets[g] = run(model, np.stack([a for a, _ in loaded]), [r for _, r in loaded])
        return sets
    sets = cached_sets(paths.root, "twohead", args.model_dir, compute, "-v2")

    inputs = ["content" if c == "feats" else c for c in args.features.split("+")]
    feats = {s: {"content": d["feats"], "style": d["style"]} for s, d in sets.items()}
    # the head `train` ships (model/cleanhead.py): L2 and T by valid NLL, standardisation folded in
    head, fits = fit_clean_head(feats["train"], ys["train"], feats["valid"], ys["valid"],
                                grid, len(CLASSES), inputs=inputs)
    for r in fits:
        print(f"  l2 {r['l2']:g}: valid NLL {r['valid_nll']:.4f} acc {r['valid_accuracy']:.4f} T {r['temperature']:.3f}")
    l2, T = head.l2, head.temperature
    clean = {s: head.probs(torch.as_tensor(x["content"]), torch.as_tensor(x["style"])) for s, x in feats.items()}

    # the mean, recalibrated: log of the mean as logits, one temperature on valid
    mix = {s: np.log(np.clip((sets[s]["probs"] + clean[s]) / 2, 1e-12, 1)) for s in sets}
    Tm = fit_temperature(mix["valid"], ys["valid"])
    mixT = {s: torch.softmax(torch.as_tensor(z) / Tm, 1).numpy() for s, z in mix.items()}

    def probs(name: str, s: str) -> np.ndarray:
        pm, pc = sets[s]["probs"], clean[s]
        return {"model": pm, "clean head": pc, "mean": (pm + pc) / 2, "mean+disagree": (pm + pc) / 2,
                "mean, T": mixT[s]}[name]

    def rule(name: str, s: str) -> tuple[np.ndarray, np.ndarray]:
        pm, pc, nov = sets[s]["probs"], clean[s], sets[s]["novel"].astype(bool)
        p, pv = probs(name, s), probs(name, "valid")
        refer = nov | (p.max(1) < fit_min_confidence(pv, lq))
        if name == "mean+disagree":
            refer = refer | (pm.argmax(1) != pc.argmax(1))
        return p, refer

    print(f"model {args.model_dir}; clean head: logistic regression on {args.features}, L2 {l2:g}, T {T:.3f} (valid NLL)")
    print(f"mean, T: T {Tm:.3f}")
    print(HEADER)
    for name in ("model", "clean head", "mean", "mean+disagree", "mean, T"):
        print(row(name, rule, sets, ys, confident), flush=True)


if __name__ == "__main__":
    main()
