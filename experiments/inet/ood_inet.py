"""A second, never fine-tuned body as a novelty part: does the distance to the training films in
*ImageNet* feature space refer the films the fine-tuned body maps into its COVID region (TB)?

The fine-tuned body learns to place every abnormal adult film near the COVID films; the ImageNet
body (the same MobileNetV2 before training, from its wheel) knows no classes and keeps how a film
looks. Runs the shipped model and the ImageNet body once over train, valid, test, each external
group and two greyscale photographs (cached in .cache/inet/), then scores each variant under the
pipeline's one valid budget: each part standardised on valid as Novelty.fit does, the max over
parts thresholded at the valid `novelty_quantile`, plus the low-confidence refer on the model's
own (two-head) probabilities. Every statistic comes from train (banks, PCA) or valid (scales,
thresholds); external films are only scored, and every variant is printed.

    .venv/bin/python experiments/inet/ood_inet.py artifacts/model
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from covid_cxr.config import CLASSES, Paths, load_params
from covid_cxr.data.cache import decoded
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.nets import build
from covid_cxr.model.novelty import KnnPart, OodModel
from covid_cxr.model.train import embeddings
from covid_cxr.model.verdict import fit_min_confidence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))  # oodtable
from oodtable import HEADER, PHOTOS, cached_sets, grey_photos, row, score_sets, truths  # noqa: E402


def model_sets(model, imgs: np.ndarray, inet, bs: int = 64) -> dict[str, np.ndarray]:
    """The shipped model's outputs (probabilities as served, its standardised novelty parts) and
    the ImageNet body's pooled features and style vector, for one set of films."""
    out: dict[str, list] = {"probs": [], "head_probs": [], "clean_probs": [], "inet": [], "inet_style": []}
    parts: dict[str, list] = {}
    with torch.inference_mode():
        for i in range(0, len(imgs), bs):
            batch = np.asarray(imgs[i:i + bs])
            p = model.predict(batch)
            out["probs"].append(torch.as_tensor(p.probs))
            logits, feats, style = model.forward(batch)
            out["head_probs"].append(torch.as_tensor(model.calibration.probs(logits)))
            out["clean_probs"].append(torch.as_tensor(model.clean.probs(feats, style)))
            for k, v in model.ood.part_scores(feats, style, logits).items():
                parts.setdefault(k, []).append(v)
            f, s = inet.embed(model.to_input(batch))
            out["inet"].append(f)
            out["inet_style"].append(s)
    res = {k: torch.cat(v).float().numpy() for k, v in out.items()}
    res.update({f"part_{k}": torch.cat(v).float().numpy() for k, v in parts.items()})
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--knn-components", type=int, default=None, help="PCA size of the ImageNet kNN (default: verdict.components.knn)")
    args = ap.parse_args()
    paths = Paths()
    params = load_params(paths.root / "params.yaml")
    vcfg, confident = params["verdict"], float(params["external"]["confident"])
    model = load_model(args.model_dir)
    inet = build(model.meta["arch"], n_classes=len(CLASSES), pretrained=True).eval()
    inet = inet.to(memory_format=torch.channels_last)
    df, ext, groups, ys = truths(paths.root, paths.manifest)

    def compute():
        t0 = time.perf_counter()
        sets = score_sets(lambda films: model_sets(model, films, inet), model.size, paths, df, ext, groups,
                          ("train", "valid", "test"))
        sets["photos"] = model_sets(model, grey_photos(model.size), inet)
        print(f"features: {time.perf_counter() - t0:.0f} s")
        # what a bf16 bank would cost at train time (the pipeline's bank_bf16): the train films once
        t1 = time.perf_counter()
        imgs = decoded(df[df["split"] == "train"].reset_index(drop=True), model.size, paths.root, paths.cache)
        embeddings(inet, imgs, model.norm, bf16=True)
        print(f"ImageNet body over the {len(imgs)} train films in bf16: {time.perf_counter() - t1:.1f} s")
        return sets
    sets = cached_sets(paths.root, "inet", args.model_dir, compute)

    q, lq, k = float(vcfg["novelty_quantile"]), float(vcfg["low_confidence_quantile"]), int(vcfg["knn_k"])
    nk = args.knn_components or int(vcfg["components"]["knn"])
    tr = sets["train"]
    new = {
        "inet_knn": (lambda m: lambda x: m.score(torch.as_tensor(x)).numpy())(KnnPart.fit(tr["inet"], nk, k)),
        "inet_maha": (lambda m: lambda x: m.score(torch.as_tensor(x)).numpy())(
            OodModel.fit(tr["inet"], ys["train"], n_components=int(vcfg["components"]["content"]))),
    }
    scores = {name: {s: (sets[s][f"part_{name}"] if f"part_{name}" in sets[s] else None) for s in sets}
              for name in ("knn", "style", "energy")}
    for name, fn in new.items():
        raw = {s: fn(d["inet"]) for s, d in sets.items()}
        c = float(np.quantile(raw["valid"], 0.5))
        sc = max(float(np.quantile(raw["valid"], q)) - c, 1e-6)
        scores[name] = {s: (v - c) / sc for s, v in raw.items()}
    min_conf = fit_min_confidence(sets["valid"]["probs"], lq)
    variants = [("knn", "style", "energy"), ("knn", "style", "energy", "inet_knn"),
                ("knn", "style", "energy", "inet_maha"), ("inet_knn", "style", "energy"),
                ("knn", "inet_knn", "energy")]
    thresholds = {}
    for parts in variants:
        thresholds[parts] = float(np.quantile(np.max([scores[p]["valid"] for p in parts], 0), q))

    def rule(name: str, s: str):
        parts = tuple(name.split(" + "))
        nov = np.max([scores[p][s] for p in parts], 0) > thresholds[parts]
        p = sets[s]["probs"]
        return p, nov | (p.max(1) < min_conf)

    print(f"model {args.model_dir}  q {q} / {lq}  min confidence {min_conf:.3f}  the model's own novelty "
          f"threshold {model.ood.threshold:.3f} ({model.ood.combine}; the rows below combine by max)")
    print(HEADER.replace("| rule |", "| parts |"))
    for parts in variants:
        print(row(" + ".join(parts), rule, sets, ys, confident))
    for parts in variants:
        print(f"  {' + '.join(parts)}: grey photographs referred "
              f"{int(rule(' + '.join(parts), 'photos')[1].sum())} of {len(PHOTOS)}")

    # the heads' weight in the answer: the pipeline takes the plain mean (0.5); here w * trained head
    # + (1 - w) * clean head, each w scored by valid NLL (the pipeline's three novelty parts as shipped)
    print("\n| trained head weight w | valid NLL | " + HEADER.split("| rule | ", 1)[1].split("\n")[0])
    print("|---" * 14 + "|")
    base = ("knn", "style", "energy")
    yv = ys["valid"]
    for w in (0.3, 0.4, 0.5, 0.6, 0.7):
        mixed = {s: w * d["head_probs"] + (1 - w) * d["clean_probs"] for s, d in sets.items()}
        nll = float(-np.log(np.clip(mixed["valid"][np.arange(len(yv)), yv], 1e-12, None)).mean())
        mc = fit_min_confidence(mixed["valid"], lq)

        def wrule(name: str, s: str, mixed=mixed, mc=mc):
            nov = np.max([scores[p][s] for p in base], 0) > thresholds[base]
            return mixed[s], nov | (mixed[s].max(1) < mc)
        print(row(f"{w:.1f} | {nll:.4f}", wrule, sets, ys, confident))


if __name__ == "__main__":
    main()
