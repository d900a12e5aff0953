"""What the clean second head reads (`train.clean_head.inputs`), and in which precision the train
films' features are taken (`bank_bf16`), on one or more trained models.

For each model the body scores every film once (cached in .cache/cleaninputs/): train in float32
and under bf16 autocast (as `train` takes the bank when `bank_bf16` is true), valid, test and the
external groups in float32 (as the service does). Then, as `train` does after the body is trained:
- the novelty model is refitted on the train films' features of that precision (valid quantiles);
- the clean head is fitted on the chosen inputs (params.yaml L2 grid, L2 and T by valid NLL);
- the low-confidence level is refitted on valid for the mean of the two heads.
`external/` is only scored.

    .venv/bin/python bench/ood_cleaninputs.py artifacts/model .cache/experiments/NAME/model ...
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from covid_cxr.config import Paths, load_params
from covid_cxr.model.checkpoint import Novelty, load_model
from covid_cxr.model.cleanhead import fit_clean_head, mix
from covid_cxr.model.train import embeddings
from covid_cxr.model.verdict import fit_min_confidence
from oodtable import HEADER, cached_sets, row, score_sets, truths

ROWS = (("f32", ("content",)), ("f32", ("content", "style")), ("f32", ("style",)),
        ("bf16", ("content",)), ("bf16", ("content", "style")))


def features(model, imgs: np.ndarray, bf16: bool = False) -> dict[str, np.ndarray]:
    content, style = embeddings(model.net, np.asarray(imgs), model.norm, desc="features", bf16=bf16)
    with torch.inference_mode():
        logits = model.net.head(content)
    return {"content": content.numpy(), "style": style.numpy(), "logits": logits.float().numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dirs", type=Path, nargs="+")
    args = ap.parse_args()
    paths = Paths()
    params = load_params(paths.root / "params.yaml")
    v, grid = params["verdict"], list(params["train"]["clean_head"]["l2"])
    confident = float(params["external"]["confident"])
    df, ext, groups, ys = truths(paths.root, paths.manifest)
    scored = ["valid", "test", *groups]
    print(HEADER.replace("| rule |", "| model, train films' features, clean head reads (kept L2, valid NLL) |"))
    for md in args.model_dirs:
        model = load_model(md)

        def compute(model=model):
            sets = score_sets(lambda films: features(model, films), model.size, paths, df, ext, groups,
                              ("train", "valid", "test"))
            bf16 = score_sets(lambda films: features(model, films, bf16=True), model.size, paths, df, ext, [],
                              ("train",))
            return {**sets, "train_bf16": bf16["train"]}
        sets = cached_sets(paths.root, "cleaninputs", md, compute)
        t = {s: {k: torch.as_tensor(x) for k, x in d.items()} for s, d in sets.items()}
        head = {s: model.calibration.probs(t[s]["logits"]) for s in scored}
        name = md.parent.name if md.name == "model" else md.name
        for bank, inputs in ROWS:
            tr = sets["train" if bank == "f32" else "train_bf16"]
            ood = Novelty.fit({"content": tr["content"], "style": tr["style"]}, ys["train"], t["valid"],
                              float(v["novelty_quantile"]), dict(v["components"]), tuple(v["novelty_parts"]),
                              model.temperature, v["knn_k"], dict(v["part_quantiles"]), combine=v["combine"])
            clean, fits = fit_clean_head(tr, ys["train"], sets["valid"], ys["valid"], grid, 3, inputs=inputs)
            probs = {s: mix(head[s], clean.probs(t[s]["content"], t[s]["style"])) for s in scored}
            min_conf = fit_min_confidence(probs["valid"], float(v["low_confidence_quantile"]))
            refer = {s: (ood.score(t[s]["content"], t[s]["style"], t[s]["logits"]) > ood.threshold).numpy()
                     | (probs[s].max(1) < min_conf) for s in scored}
            nll = min(f["valid_nll"] for f in fits)
            label = f"{name}, {bank}, {'+'.join(inputs)} (L2 {clean.l2:g}, {nll:.4f})"
            print(row(label, lambda _n, s: (probs[s], refer[s]), {s: None for s in scored}, ys, confident),
                  flush=True)


if __name__ == "__main__":
    main()
