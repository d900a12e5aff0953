"""A patch-level novelty part (PatchCore-like): is some *region* of the film unlike every region of
the training films, where the pooled features (one vector per film) average it away?

Tuberculosis films come from the same database as `other_normal`, which the model labels right
and rarely refers: their acquisition style is familiar, their lesions are not. So this scores
local feature vectors: for each spatial position of a body layer's feature map (optionally only
inside the central lung field, `evaluate.lung_box`), the cosine distance to the nearest patch of
a random sample of training-film patches (PCA-reduced, fitted on train), and the film's score is
the largest of them. Each variant joins the shipped model's parts (knn, style, energy) under the
pipeline's one valid budget, as experiments/inet/ood_inet.py does; every statistic comes from train (bank,
PCA) or valid (scales, thresholds); external films are only scored.

Needs experiments/inet/ood_inet.py's cache for the same model (the shipped parts and probabilities).

    .venv/bin/python experiments/patch/ood_patch.py artifacts/model
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from covid_cxr.config import Paths, load_params
from covid_cxr.data.cache import decoded
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.novelty import pca
from covid_cxr.model.verdict import fit_min_confidence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))  # oodtable
from oodtable import HEADER, cache_path, external_films, grey_photos, load_sets, row, truths  # noqa: E402

LAYERS = (13, 16, 18)   # mobilenet_v2 body: 96 ch at 1/16, 160 ch at 1/32, the last 1280 ch at 1/32


def patch_maps(model, imgs: np.ndarray, bs: int = 64) -> dict[int, np.ndarray]:
    """(N, H*W, C) float16 feature vectors per layer in LAYERS."""
    out: dict[int, list] = {k: [] for k in LAYERS}
    with torch.inference_mode():
        for i in range(0, len(imgs), bs):
            x = model.to_input(np.asarray(imgs[i:i + bs]))
            for j, m in enumerate(model.net.body):
                x = m(x)
                if j in LAYERS:
                    out[j].append(x.float().flatten(2).transpose(1, 2).half())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def lung_positions(side: int, box) -> np.ndarray:
    top, bottom, left, right = box
    r = (np.arange(side) + 0.5) / side
    m = ((r[:, None] >= top) & (r[:, None] <= bottom)) & ((r[None, :] >= left) & (r[None, :] <= right))
    return m.ravel()


class PatchPart:
    def __init__(self, train: np.ndarray, n_components: int, n_bank: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        flat = train.reshape(-1, train.shape[-1])
        pick = rng.choice(len(flat), size=min(n_bank, len(flat)), replace=False)
        x = torch.as_tensor(flat[pick], dtype=torch.float64)
        self.mean, self.comp = (t.float() for t in pca(x, n_components))
        self.bank = self._unit(x.float())

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.float() - self.mean) @ self.comp.T
        return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def score(self, films: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
        res = []
        for i in range(0, len(films), 32):
            f = torch.as_tensor(films[i:i + 32]).float()
            if positions is not None:
                f = f[:, torch.as_tensor(positions)]
            u = self._unit(f)                              # (B, P, K)
            d = 1.0 - (u @ self.bank.T).amax(-1)           # nearest bank patch per position
            res.append(d.amax(1))                          # the film's most unusual position
        return torch.cat(res).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--bank", type=int, default=30000, help="training patches in the bank (random sample)")
    ap.add_argument("--components", type=int, default=64)
    args = ap.parse_args()
    paths = Paths()
    params = load_params(paths.root / "params.yaml")
    vcfg, confident = params["verdict"], float(params["external"]["confident"])
    model = load_model(args.model_dir)
    sets = load_sets(cache_path(paths.root, "inet", args.model_dir))
    if sets is None:
        raise SystemExit("run experiments/inet/ood_inet.py on this model first (its cache holds the shipped parts)")
    df, ext, groups, ys = truths(paths.root, paths.manifest)

    t0 = time.perf_counter()
    maps = {}
    for s in ("train", "valid", "test"):
        maps[s] = patch_maps(model, decoded(df[df["split"] == s].reset_index(drop=True), model.size,
                                            paths.root, paths.cache))
    for g in groups:
        maps[g] = patch_maps(model, external_films(paths.root, ext, g, model.size))
    maps["photos"] = patch_maps(model, grey_photos(model.size))
    print(f"feature maps: {time.perf_counter() - t0:.0f} s")

    q, lq = float(vcfg["novelty_quantile"]), float(vcfg["low_confidence_quantile"])
    box = params["evaluate"]["lung_box"]
    scores = {name: {s: sets[s][f"part_{name}"] for s in sets} for name in ("knn", "style", "energy")}
    for layer in LAYERS:
        t1 = time.perf_counter()
        part = PatchPart(maps["train"][layer], args.components, args.bank)
        side = int(round(np.sqrt(maps["train"][layer].shape[1])))
        for where, pos in (("all", None), ("lung", lung_positions(side, box))):
            raw = {s: part.score(m[layer], pos) for s, m in maps.items()}
            c = float(np.quantile(raw["valid"], 0.5))
            sc = max(float(np.quantile(raw["valid"], q)) - c, 1e-6)
            scores[f"patch{layer}_{where}"] = {s: (v - c) / sc for s, v in raw.items()}
        print(f"  layer {layer} ({side}x{side}): bank and scores {time.perf_counter() - t1:.0f} s")
    min_conf = fit_min_confidence(sets["valid"]["probs"], lq)
    base = ("knn", "style", "energy")
    variants = [base] + [base + (f"patch{layer}_{w}",) for layer in LAYERS for w in ("all", "lung")]
    variants += [(f"patch{layer}_{w}", "style", "energy") for layer in LAYERS for w in ("all", "lung")]
    thresholds = {v: float(np.quantile(np.max([scores[p]["valid"] for p in v], 0), q)) for v in variants}

    def rule(name: str, s: str):
        v = tuple(name.split(" + "))
        nov = np.max([scores[p][s] for p in v], 0) > thresholds[v]
        p = sets[s]["probs"]
        return p, nov | (p.max(1) < min_conf)

    print(f"model {args.model_dir}  q {q} / {lq}  bank {args.bank} patches, PCA {args.components}")
    print(HEADER.replace("| rule |", "| parts |"))
    for v in variants:
        print(row(" + ".join(v), rule, sets, ys, confident))
    for v in variants:
        print(f"  {' + '.join(v)}: grey photographs referred {int(rule(' + '.join(v), 'photos')[1].sum())} of 2")


if __name__ == "__main__":
    main()
