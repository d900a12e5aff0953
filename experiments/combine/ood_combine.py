"""How the novelty parts are combined (`verdict.combine`): the largest standardised part against
their sum (the pipeline's rule since 2026-12-04) and two variants, on one or more trained models.

Each model's own parts (as `train` fitted and standardised them on train and valid) score every
set once (cached in .cache/combine/); each rule's threshold is its valid `novelty_quantile`, and
the low-confidence refer is the model's own. `external/` is only scored.

    .venv/bin/python experiments/combine/ood_combine.py artifacts/model .cache/experiments/NAME/model ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from covid_cxr.config import Paths, load_params
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.cleanhead import mix

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))  # oodtable
from oodtable import HEADER, PHOTOS, cached_sets, grey_photos, row, score_sets, truths  # noqa: E402


def parts_and_probs(model, imgs: np.ndarray, bs: int = 64) -> dict[str, np.ndarray]:
    out: dict[str, list] = {"probs": []}
    with torch.inference_mode():
        for i in range(0, len(imgs), bs):
            logits, feats, style = model.forward(np.asarray(imgs[i:i + bs]))
            probs = model.calibration.probs(logits)
            if model.clean is not None:   # as LoadedModel.predict answers
                probs = mix(probs, model.clean.probs(feats, style))
            out["probs"].append(torch.as_tensor(probs))
            for k, v in model.ood.part_scores(feats, style, logits).items():
                out.setdefault(f"part_{k}", []).append(v)
    return {k: torch.cat(v).float().numpy() for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dirs", type=Path, nargs="+")
    args = ap.parse_args()
    paths = Paths()
    params = load_params(paths.root / "params.yaml")
    q, confident = float(params["verdict"]["novelty_quantile"]), float(params["external"]["confident"])
    df, ext, groups, ys = truths(paths.root, paths.manifest, ("valid", "test"))
    print(HEADER.replace("| rule |", "| model, rule |"))
    for md in args.model_dirs:
        model = load_model(md)

        def compute(model=model):
            sets = score_sets(lambda films: parts_and_probs(model, films), model.size, paths, df, ext, groups)
            sets["photos"] = parts_and_probs(model, grey_photos(model.size))   # the style part's job, every rule
            return sets
        sets = cached_sets(paths.root, "combine", md, compute)
        names = [k[5:] for k in sets["valid"] if k.startswith("part_")]
        min_conf = float(model.policy.min_confidence)
        rules = {
            "max": lambda d: np.max([d[f"part_{n}"] for n in names], 0),
            "sum": lambda d: np.sum([d[f"part_{n}"] for n in names], 0),
            "sum of the positive parts": lambda d: np.sum([np.clip(d[f"part_{n}"], 0, None) for n in names], 0),
        }
        if "style" in names:   # style scaled at its 99.9 % quantile: keep it as a max, sum the others
            rest = [n for n in names if n != "style"]
            # style is 1 at its own valid 99.9 % quantile; map that onto the sum's valid q quantile
            unit = float(np.quantile(np.sum([sets["valid"][f"part_{n}"] for n in rest], 0), q))
            rules["max(style, sum of the others)"] = lambda d: np.maximum(
                d["part_style"] * unit, np.sum([d[f"part_{n}"] for n in rest], 0))
        thr = {r: float(np.quantile(f(sets["valid"]), q)) for r, f in rules.items()}

        def rule(name: str, s: str, rules=rules, thr=thr, sets=sets, min_conf=min_conf):
            r = name.split(", ", 1)[1]
            p = sets[s]["probs"]
            return p, (rules[r](sets[s]) > thr[r]) | (p.max(1) < min_conf)
        name = md.parent.name if md.name == "model" else md.name
        for r in rules:
            print(row(f"{name}, {r}", rule, sets, ys, confident))
        print("  grey photographs referred: " + ", ".join(
            f"{r} {int(rule(f'{name}, {r}', 'photos')[1].sum())} of {len(PHOTOS)}" for r in rules))


if __name__ == "__main__":
    main()
