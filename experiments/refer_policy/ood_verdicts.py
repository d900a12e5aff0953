"""Refer policies on one trained model, without retraining: which novelty parts, which budget?

For a model directory, runs the body once per split (train, valid, test) and per external group,
then, for each policy (novelty parts, novelty quantile, low-confidence quantile), fits the
novelty model on train and its thresholds on valid as `train` did when this study was run, one
head and parts combined by their max (Novelty.fit, fit_min_confidence; today's fit, with the
clean head and the sum, is referpolicy.fit_refer_policy), and prints the test and external
figures of the verdict. External films are only scored; no policy is chosen on them by this script: it prints
every row it is given.

    .venv/bin/python experiments/refer_policy/ood_verdicts.py .cache/experiments/cpu-u3/model
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
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.novelty import Novelty
from covid_cxr.model.verdict import Policy, decide, fit_min_confidence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))  # oodtable
from oodtable import PHOTOS, external_films, grey_photos  # noqa: E402

POLICIES = [  # (novelty parts, novelty quantile, low-confidence quantile, per-part scale quantiles)
    (("knn", "style", "energy"), 0.985, 0.005, {}),
    (("knn", "energy"), 0.985, 0.005, {}),
    (("knn", "style", "energy"), 0.985, 0.005, {"style": 0.995}),
    (("knn", "style", "energy"), 0.985, 0.005, {"style": 0.999}),
    (("knn", "style", "energy"), 0.985, 0.005, {"style": 1.0}),
]


def forward_all(model, imgs: np.ndarray, bs: int = 64):
    out = {"content": [], "style": [], "logits": []}
    with torch.inference_mode():
        for i in range(0, len(imgs), bs):
            logits, feats, style = model.forward(np.asarray(imgs[i:i + bs]))
            out["content"].append(feats)
            out["style"].append(style)
            out["logits"].append(logits)
    return {k: torch.cat(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    args = ap.parse_args()
    paths = Paths()
    params = load_params(paths.root / "params.yaml")
    vcfg, confident = params["verdict"], float(params["external"]["confident"])
    model = load_model(args.model_dir)
    df = pd.read_csv(paths.manifest)
    y_all = df["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    sets, ys = {}, {}
    for split in ("train", "valid", "test"):
        sub = df[df["split"] == split].reset_index(drop=True)
        sets[split] = forward_all(model, decoded(sub, model.size, paths.root, paths.cache))
        ys[split] = y_all[df["split"].to_numpy() == split]
    ext = pd.read_csv(paths.root / "external" / "labels.csv")
    for g in sorted(ext["group"].unique()):
        rows = ext[ext["group"] == g]
        sets[g] = forward_all(model, external_films(paths.root, ext, g, model.size))
        ys[g] = np.array([CLASSES.index(x) if x in CLASSES else -1 for x in rows["label"]])
    # through the shared preprocessing (load_film), as the service decodes an upload
    sets["photos"], ys["photos"] = forward_all(model, grey_photos(model.size)), np.full(len(PHOTOS), -1)
    T = model.temperature
    probs = {k: torch.softmax(v["logits"] / T, 1).numpy() for k, v in sets.items()}
    print(f"model {args.model_dir}  size {model.size}  T {T:.3f}")
    print("| parts | novelty q | low-conf q | valid flagged | test flagged | test acc (ok films) "
          "| unseen right | unseen flagged | unseen conf-wrong | unseen right-or-flagged "
          "| TB flagged | TB conf-wrong | other right | other flagged | grey photos referred |")
    for parts, q, lq, pq in POLICIES:
        nov = Novelty.fit({k: sets["train"][k].numpy() for k in ("content", "style")}, ys["train"],
                          sets["valid"], q, dict(vcfg["components"]), parts, T, vcfg.get("knn_k"), pq,
                          combine="max")   # this study's tables were measured under the max (experiments/combine: sum)
        pol = Policy(min_confidence=fit_min_confidence(probs["valid"], lq))
        fig = {}
        for k, v in sets.items():
            novel = (nov.score(v["content"], v["style"], v["logits"]) > nov.threshold).numpy()
            verdicts, _ = decide(probs[k], novel, pol)
            flagged = np.array([x == "refer" for x in verdicts])
            pred = probs[k].argmax(1)
            right = pred == ys[k]
            cw = ~right & ~flagged & (probs[k].max(1) >= confident)
            fig[k] = dict(flagged=flagged.mean(), right=right.mean(), cw=cw.mean(), rof=(right | flagged).mean(),
                          ok_acc=right[~flagged].mean())
        u, tb, on = fig["unseen_hospital_normal"], fig["tuberculosis"], fig["other_normal"]
        pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
        print(f"| {'+'.join(parts)}{' ' + str(pq) if pq else ''} | {q} | {lq} | {pct(fig['valid']['flagged'])} | {pct(fig['test']['flagged'])} "
              f"| {fig['test']['ok_acc']:.4f} | {pct(u['right'])} | {pct(u['flagged'])} | {pct(u['cw'])} "
              f"| {pct(u['rof'])} | {pct(tb['flagged'])} | {pct(tb['cw'])} | {pct(on['right'])} | {pct(on['flagged'])} "
              f"| {int(fig['photos']['flagged'] * len(PHOTOS))} of {len(PHOTOS)} |",
              flush=True)


if __name__ == "__main__":
    main()
