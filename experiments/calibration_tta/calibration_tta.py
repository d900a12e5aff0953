"""Calibration variants and test-time augmentation on one trained model, at the pipeline's refer budget.

Runs the model over valid, test and each external group under a few views (the film itself, a
centre zoom, two small rotations; cached in .cache/calib/) and compares, per variant:
- `T`: temperature only (the pipeline today), `T+b`: temperature plus a per-class logit bias, both
  fitted by valid NLL (vector scaling restricted to a bias, Guo et al. 2017);
- `single`: the film alone, `tta`: the mean logits of the views.
For each, the knn and style parts are the model's own (fitted on train at training time), the
energy part is recomputed on that variant's logits, and every scale, threshold and the
low-confidence level are refitted on valid, as train.py does. External films are only scored.

    .venv/bin/python experiments/calibration_tta/calibration_tta.py artifacts/model
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from covid_cxr.config import CLASSES, Paths, load_params
from covid_cxr.data.cache import decoded
from covid_cxr.evaluation.metrics import COVID, ece
from covid_cxr.evaluation.scoring import load_film
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.calibration import fit_temperature, fit_temperature_bias
from covid_cxr.model.verdict import fit_min_confidence


def view(imgs: np.ndarray, name: str) -> np.ndarray:
    if name == "id":
        return imgs
    s = imgs.shape[-1]
    out = np.empty_like(imgs)
    for i, g in enumerate(imgs):
        im = Image.fromarray(g)
        if name == "zoom":
            c = int(round(s * 0.05))
            im = im.crop((c, c, s - c, s - c)).resize((s, s), Image.BILINEAR)
        else:
            im = im.rotate(float(name[3:]), resample=Image.BILINEAR, fillcolor=0)
        out[i] = np.asarray(im)
    return out


VIEWS = ("id", "zoom", "rot5", "rot-5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    args = ap.parse_args()
    paths = Paths()
    params = load_params(paths.root / "params.yaml")
    vcfg, confident = params["verdict"], float(params["external"]["confident"])
    model = load_model(args.model_dir)
    ood = model.ood
    df = pd.read_csv(paths.manifest)
    ext = pd.read_csv(paths.root / "external" / "labels.csv")
    groups = sorted(ext["group"].unique())
    key = hashlib.sha1((args.model_dir / "model.safetensors").read_bytes()).hexdigest()[:12]
    cache = paths.root / ".cache" / "calib" / f"{key}.npz"
    ys = {s: df[df["split"] == s]["label"].map(CLASSES.index).to_numpy() for s in ("valid", "test")}
    for g in groups:
        ys[g] = np.array([CLASSES.index(x) if x in CLASSES else -1 for x in ext[ext["group"] == g]["label"]])
    if cache.exists():
        z = np.load(cache)
        data = {k: z[k] for k in z.files}
    else:
        imgs = {s: decoded(df[df["split"] == s].reset_index(drop=True), model.size, paths.root, paths.cache)
                for s in ("valid", "test")}
        for g in groups:
            imgs[g] = np.stack([load_film(paths.root / "external" / f, model.size, model.min_side)[0]
                                for f in ext[ext["group"] == g]["file"]])
        data = {}
        for s, im in imgs.items():
            for v in VIEWS:
                lg, parts = [], {"knn": [], "style": []}
                for i in range(0, len(im), 64):
                    logits, feats, style = model.forward(view(np.asarray(im[i:i + 64]), v))
                    lg.append(logits)
                    if v == "id":
                        ps = ood.part_scores(feats, style, logits)
                        parts["knn"].append(ps["knn"])
                        parts["style"].append(ps["style"])
                data[f"{s}/{v}"] = torch.cat(lg).float().numpy()
                if v == "id":
                    for p in parts:
                        data[f"{s}/part_{p}"] = torch.cat(parts[p]).numpy()
            print("cached", s, flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **data)
    sets = ["valid", "test", *groups]
    q, lq = float(vcfg["novelty_quantile"]), float(vcfg["low_confidence_quantile"])
    pq = dict(vcfg["part_quantiles"])
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    print("| logits | calibration | T | bias (C/N/VP) | test acc | COVID recall | test ECE | test flagged | unseen right "
          "| unseen flagged | unseen conf-wrong | unseen right-or-flagged | TB flagged | TB conf-wrong | TB called COVID "
          "| other right |")
    for src in ("single", "tta"):
        zs = {s: data[f"{s}/id"] if src == "single" else np.mean([data[f"{s}/{v}"] for v in VIEWS], 0) for s in sets}
        for calib, extra in (("T", ()), ("T+b", ()), ("T", ("instability",)), ("T+b", ("instability",))):
            if extra and src == "single":
                continue
            if calib == "T":
                T, b = fit_temperature(zs["valid"], ys["valid"]), np.zeros(len(CLASSES))
            else:
                T, b = fit_temperature_bias(zs["valid"], ys["valid"])
                b = np.array(b)
            probs = {s: torch.softmax(torch.as_tensor(zs[s] / T + b), 1).numpy() for s in sets}
            raw = {"knn": {s: data[f"{s}/part_knn"] for s in sets}, "style": {s: data[f"{s}/part_style"] for s in sets},
                   "energy": {s: -T * torch.logsumexp(torch.as_tensor(zs[s]) / T, 1).numpy() for s in sets}}
            if extra:   # how much the views disagree: mean total-variation distance to the mean prediction
                pv = {s: np.stack([torch.softmax(torch.as_tensor(data[f"{s}/{v}"] / T + b), 1).numpy()
                                   for v in VIEWS]) for s in sets}
                raw["instability"] = {s: 0.5 * np.abs(pv[s] - probs[s][None]).sum(-1).mean(0) for s in sets}
            std = {}
            for p, r in raw.items():   # knn/style are already standardised by the model; restandardise all alike
                v = r["valid"]
                c = np.quantile(v, 0.5)
                sc = max(np.quantile(v, pq.get(p, q)) - c, 1e-6)
                std[p] = {s: (r[s] - c) / sc for s in sets}
            score = {s: np.max([std[p][s] for p in std], 0) for s in sets}
            thr = np.quantile(score["valid"], q)
            min_conf = fit_min_confidence(probs["valid"], lq)
            fig = {}
            for s in sets:
                conf, pred = probs[s].max(1), probs[s].argmax(1)
                flagged = (score[s] > thr) | (conf < min_conf)
                right = pred == ys[s]
                fig[s] = dict(flagged=flagged.mean(), right=right.mean(), rof=(right | flagged).mean(),
                              cw=(~right & ~flagged & (conf >= confident)).mean(), covid=(pred == COVID).mean())
            yt, pt = ys["test"], probs["test"].argmax(1)
            rec = float((pt[yt == COVID] == COVID).mean())
            u, tb, on = fig["unseen_hospital_normal"], fig["tuberculosis"], fig["other_normal"]
            print(f"| {src}{'+'.join(('',) + extra)} | {calib} | {T:.3f} | {' / '.join(f'{x:+.2f}' for x in b)} | {fig['test']['right']:.4f} "
                  f"| {rec:.4f} | {ece(probs['test'], yt, 15):.4f} | {pct(fig['test']['flagged'])} | {pct(u['right'])} "
                  f"| {pct(u['flagged'])} | {pct(u['cw'])} | {pct(u['rof'])} | {pct(tb['flagged'])} | {pct(tb['cw'])} "
                  f"| {pct(tb['covid'])} | {pct(on['right'])} |", flush=True)


if __name__ == "__main__":
    main()
