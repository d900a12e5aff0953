"""Post-hoc novelty parts on one trained model: do ReAct-clipped energy or a kNN on the head's
hidden layer refer more of what the model cannot handle, at the same valid budget?

Runs the model once over train, valid, test, each external group and two greyscale photographs
(features cached in .cache/posthoc/), then, per variant, standardises each part on valid as
Novelty.fit does ((s - median) / (q-quantile - median)), takes the max, thresholds it at the
valid `novelty_quantile` and adds the low-confidence refer. Every statistic comes from train
(bank, clip level) or valid (scales, thresholds); external films are only scored, and every
variant given is printed.

    .venv/bin/python experiments/posthoc/ood_posthoc.py artifacts/model
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from covid_cxr.config import Paths, load_params
from covid_cxr.data.cache import decoded
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.novelty import KnnPart, OodModel
from covid_cxr.model.verdict import fit_min_confidence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))  # oodtable
from oodtable import PHOTOS, cached_sets, grey_photos, score_sets, truths  # noqa: E402


def forward_all(model, imgs: np.ndarray, react: float | None, bs: int = 64) -> dict[str, np.ndarray]:
    out: dict[str, list] = {"content": [], "style": [], "logits": [], "hidden": [], "react": []}
    head = model.net.head
    with torch.inference_mode():
        for i in range(0, len(imgs), bs):
            logits, feats, style = model.forward(np.asarray(imgs[i:i + bs]))
            out["content"].append(feats)
            out["style"].append(style)
            out["logits"].append(logits)
            out["hidden"].append(head[:5](feats))           # BN, dropout, linear, ReLU, BN (eval)
            if react is not None:
                out["react"].append(head(feats.clamp(max=react)))
    return {k: torch.cat(v).float().numpy() for k, v in out.items() if v}


def knn_scorer(train: np.ndarray, n: int, k: int):
    """The pipeline's `knn` part (KnnPart: k-th nearest training film, cosine in a PCA space)."""
    m = KnnPart.fit(train, n, k)
    return lambda x: m.score(torch.as_tensor(x)).numpy()


def knn_cc_scorer(train: np.ndarray, labels: np.ndarray, n: int, k: int):
    """Class-conditional kNN: the k-th nearest training film *of the predicted class* (one PCA on
    all train films, as KnnPart). A film the head calls COVID is judged against COVID films only."""
    m = KnnPart.fit(train, n, k)
    lab = torch.as_tensor(labels)

    def score(x: np.ndarray, pred: np.ndarray) -> np.ndarray:
        sim = m._unit(torch.as_tensor(x)) @ m.bank.T
        sim[torch.as_tensor(pred)[:, None] != lab[None, :]] = -2.0
        return (1.0 - sim.topk(k, dim=1).values[:, -1]).numpy()
    return score


def style_scorer(train: np.ndarray, labels: np.ndarray, n: int):
    """The pipeline's own `style` part (OodModel: Mahalanobis + residual, fitted on train)."""
    m = OodModel.fit(train, labels, n_components=n)
    return lambda x: m.score(torch.as_tensor(x)).numpy()


def energy(logits: np.ndarray, T: float) -> np.ndarray:
    return -T * torch.logsumexp(torch.as_tensor(logits) / T, dim=1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--react-pct", type=float, default=90.0, help="ReAct clip: this percentile of train activations")
    args = ap.parse_args()
    paths = Paths()
    params = load_params(paths.root / "params.yaml")
    vcfg, confident = params["verdict"], float(params["external"]["confident"])
    model = load_model(args.model_dir)
    T = model.temperature
    df, ext, groups, ys = truths(paths.root, paths.manifest)

    def compute():
        train = decoded(df[df["split"] == "train"].reset_index(drop=True), model.size, paths.root, paths.cache)
        with torch.inference_mode():
            tr = []
            for i in range(0, len(train), 64):
                tr.append(model.forward(np.asarray(train[i:i + 64]))[1])
            react = float(np.percentile(torch.cat(tr).numpy(), args.react_pct))
        sets = score_sets(lambda films: forward_all(model, films, react), model.size, paths, df, ext, groups,
                          ("train", "valid", "test"))
        sets["photos"] = forward_all(model, grey_photos(model.size), react)
        print(f"ReAct clip level (train {args.react_pct:g}th percentile): {react:.4f}")
        return sets
    sets = cached_sets(paths.root, "posthoc", args.model_dir, compute, f"-react{args.react_pct:g}")
    probs = {k: torch.softmax(torch.as_tensor(v["logits"]) / T, 1).numpy() for k, v in sets.items()}
    q, lq, k = float(vcfg["novelty_quantile"]), float(vcfg["low_confidence_quantile"]), int(vcfg["knn_k"])
    comps = dict(vcfg["components"])
    tr = sets["train"]
    scorers = {
        "knn": lambda d, f=knn_scorer(tr["content"], comps["knn"], k): f(d["content"]),
        "knn_hidden": lambda d, f=knn_scorer(tr["hidden"], tr["hidden"].shape[1], k): f(d["hidden"]),
        "style": lambda d, f=style_scorer(tr["style"], ys["train"], comps["style"]): f(d["style"]),
        "knn_cc": lambda d, f=knn_cc_scorer(tr["content"], ys["train"], comps["knn"], k): f(d["content"], d["logits"].argmax(1)),
        "energy": lambda d: energy(d["logits"], T),
        "energy_react": lambda d: energy(d["react"], T),
    }
    raw = {name: {s: fn(d) for s, d in sets.items()} for name, fn in scorers.items()}
    variants = [
        (("knn", "style", "energy"), {"style": 0.999}),
        (("knn", "style", "energy_react"), {"style": 0.999}),
        (("knn_hidden", "style", "energy"), {"style": 0.999}),
        (("knn_hidden", "style", "energy_react"), {"style": 0.999}),
        (("knn", "knn_hidden", "style", "energy"), {"style": 0.999}),
        (("knn", "knn_hidden", "style", "energy_react"), {"style": 0.999}),
        (("knn_cc", "style", "energy"), {"style": 0.999}),
        (("knn", "knn_cc", "style", "energy"), {"style": 0.999}),
    ]
    min_conf = fit_min_confidence(probs["valid"], lq)
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    print(f"model {args.model_dir}  T {T:.3f}  q {q} / {lq}")
    print("| parts | valid flagged | test flagged | test acc (ok) | unseen right | unseen flagged | unseen conf-wrong "
          "| unseen right-or-flagged | TB flagged | TB conf-wrong | other right | other flagged | photos referred |")
    for parts, pq in variants:
        std = {}
        for p in parts:
            v = raw[p]["valid"]
            c = np.quantile(v, 0.5)
            sc = max(np.quantile(v, pq.get(p, q)) - c, 1e-6)
            std[p] = {s: (raw[p][s] - c) / sc for s in sets}
        score = {s: np.max([std[p][s] for p in parts], axis=0) for s in sets}
        thr = np.quantile(score["valid"], q)
        fig = {}
        for s in sets:
            conf = probs[s].max(1)
            flagged = (score[s] > thr) | (conf < min_conf)
            right = probs[s].argmax(1) == ys[s]
            cw = ~right & ~flagged & (conf >= confident)
            fig[s] = dict(flagged=flagged.mean(), right=right.mean(), cw=cw.mean(), rof=(right | flagged).mean(),
                          ok_acc=right[~flagged].mean(), n=int(flagged.sum()))
        u, tb, on = fig["unseen_hospital_normal"], fig["tuberculosis"], fig["other_normal"]
        print(f"| {'+'.join(parts)} {pq or ''} | {pct(fig['valid']['flagged'])} | {pct(fig['test']['flagged'])} "
              f"| {fig['test']['ok_acc']:.4f} | {pct(u['right'])} | {pct(u['flagged'])} | {pct(u['cw'])} | {pct(u['rof'])} "
              f"| {pct(tb['flagged'])} | {pct(tb['cw'])} | {pct(on['right'])} | {pct(on['flagged'])} "
              f"| {fig['photos']['n']} of {len(PHOTOS)} |", flush=True)


if __name__ == "__main__":
    main()
