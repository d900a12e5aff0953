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

    .venv/bin/python bench/ood_twohead.py .cache/experiments/cpu-acq-p0.25-2026-12-03/model
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covid_cxr.config import CLASSES, Paths, load_params
from covid_cxr.data.cache import decoded
from covid_cxr.evaluation.metrics import COVID, ece
from covid_cxr.evaluation.scoring import load_film
from covid_cxr.model.calibration import fit_temperature
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.verdict import fit_min_confidence


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


def fit_logreg(x: np.ndarray, y: np.ndarray, l2: float) -> torch.nn.Linear:
    xt, yt = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)
    lin = torch.nn.Linear(x.shape[1], len(CLASSES)).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), yt) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return lin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--features", default="feats", help="feats | style | feats+style: what the clean head reads")
    ap.add_argument("--l2", default="1e-3,3e-3,1e-2,3e-2,0.1,0.3,1", help="the L2 grid, comma-separated")
    args = ap.parse_args()
    paths = Paths()
    params = load_params(paths.root / "params.yaml")
    confident = float(params["external"]["confident"])
    lq = float(params["verdict"]["low_confidence_quantile"])
    model = load_model(args.model_dir)
    model.clean = None      # a pipeline model ships a clean head already: study the trained head's body alone
    df = pd.read_csv(paths.manifest)
    ext = pd.read_csv(paths.root / "external" / "labels.csv")
    groups = sorted(ext["group"].unique())
    key = hashlib.sha1((args.model_dir / "model.safetensors").read_bytes()).hexdigest()[:12]
    cache = paths.root / ".cache" / "twohead" / f"{key}-v2.npz"
    ys = {s: df[df["split"] == s]["label"].map(CLASSES.index).to_numpy() for s in ("train", "valid", "test")}
    for g in groups:
        ys[g] = np.array([CLASSES.index(x) if x in CLASSES else -1 for x in ext[ext["group"] == g]["label"]])
    if cache.exists():
        z = np.load(cache)
        sets: dict[str, dict[str, np.ndarray]] = {}
        for name in z.files:
            s, f = name.split("/")
            sets.setdefault(s, {})[f] = z[name]
    else:
        sets = {}
        for s in ("train", "valid", "test"):
            d = df[df["split"] == s].reset_index(drop=True)
            sets[s] = run(model, decoded(d, model.size, paths.root, paths.cache), None)
            print(f"  {s} scored", flush=True)
        for g in groups:
            loaded = [load_film(paths.root / "external" / f, model.size) for f in ext[ext["group"] == g]["file"]]
            sets[g] = run(model, np.stack([a for a, _ in loaded]), [r for _, r in loaded])
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **{f"{s}/{f}": v for s, d in sets.items() for f, v in d.items()})

    cols = args.features.split("+")
    feats = {s: np.concatenate([d[c] for c in cols], 1) for s, d in sets.items()}
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    std = {s: (x - mu) / sd for s, x in feats.items()}
    best = None
    for l2 in (float(v) for v in args.l2.split(",")):
        lin = fit_logreg(std["train"], ys["train"], l2)
        with torch.no_grad():
            zv = lin(torch.as_tensor(std["valid"], dtype=torch.float64))
        T = fit_temperature(zv.numpy(), ys["valid"])
        nll = float(torch.nn.functional.cross_entropy(zv / T, torch.as_tensor(ys["valid"])))
        acc = float((zv.argmax(1).numpy() == ys["valid"]).mean())
        print(f"  l2 {l2:g}: valid NLL {nll:.4f} acc {acc:.4f} T {T:.3f}")
        if best is None or nll < best[0]:
            best = (nll, l2, lin, T)
    _, l2, lin, T = best
    with torch.no_grad():
        clean = {s: torch.softmax(lin(torch.as_tensor(x, dtype=torch.float64)) / T, 1).numpy() for s, x in std.items()}

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

    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    print(f"model {args.model_dir}; clean head: logistic regression on {args.features}, L2 {l2:g}, T {T:.3f} (valid NLL)")
    print("| rule | valid flagged | test acc | COVID recall | test ECE | test flagged | unseen right | unseen flagged "
          "| unseen conf-wrong | unseen right or flagged | TB flagged | TB conf-wrong | other right |")
    print("|---" * 13 + "|")
    print(f"mean, T: T {Tm:.3f}")
    for name in ("model", "clean head", "mean", "mean+disagree", "mean, T"):
        fig = {}
        for s in sets:
            p, refer = rule(name, s)
            right = p.argmax(1) == ys[s]
            fig[s] = dict(flagged=refer.mean(), right=right.mean(), rof=(right | refer).mean(),
                          cw=(~right & ~refer & (p.max(1) >= confident)).mean())
        pt, yt = rule(name, "test")[0], ys["test"]
        rec = float((pt.argmax(1)[yt == COVID] == COVID).mean())
        u, tb, on = fig["unseen_hospital_normal"], fig["tuberculosis"], fig["other_normal"]
        print(f"| {name} | {pct(fig['valid']['flagged'])} | {fig['test']['right']:.4f} | {rec:.4f} "
              f"| {ece(pt, yt, 15):.4f} | {pct(fig['test']['flagged'])} | {pct(u['right'])} | {pct(u['flagged'])} "
              f"| {pct(u['cw'])} | {pct(u['rof'])} | {pct(tb['flagged'])} | {pct(tb['cw'])} | {pct(on['right'])} |",
              flush=True)


if __name__ == "__main__":
    main()
