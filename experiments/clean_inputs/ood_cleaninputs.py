"""What the clean second head reads (`train.clean_head.inputs`), and in which precision the train
films' features are taken (`bank_bf16`), on one or more trained models.

For each model the body scores every film once (cached in .cache/cleaninputs/): train in float32
and under bf16 autocast (as `train` takes the bank when `bank_bf16` is true), valid, test and the
external groups in float32 (as the service does). Then the refer policy is refitted per row by
`referpolicy.fit_refer_policy`, the function `train` calls after the body is trained (with the
model's own calibration kind and params.yaml's `verdict`):
- the novelty model on the train films' features of that precision (valid quantiles);
- the clean head on the chosen inputs (params.yaml L2 grid, L2 and T by valid NLL);
- the low-confidence level on valid, for the mean of the two heads.
`external/` is only scored.

    .venv/bin/python experiments/clean_inputs/ood_cleaninputs.py artifacts/model .cache/experiments/NAME/model ...
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
from covid_cxr.model.referpolicy import Features, fit_refer_policy
from covid_cxr.model.train import embeddings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))  # oodtable
from oodtable import HEADER, cached_sets, row, score_sets, truths  # noqa: E402

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
        calibration = "temperature" if model.calibration.bias is None else "temperature_bias"
        valid = Features(t["valid"]["content"], t["valid"]["style"], ys["valid"], t["valid"]["logits"])
        name = md.parent.name if md.name == "model" else md.name
        for bank, inputs in ROWS:
            tr = t["train" if bank == "f32" else "train_bf16"]
            pol = fit_refer_policy(Features(tr["content"], tr["style"], ys["train"]), valid, calibration=calibration,
                                   verdict=v, clean_head={"l2": grid, "inputs": list(inputs)})
            probs = {s: mix(pol.calibration.probs(t[s]["logits"]), pol.clean.probs(t[s]["content"], t[s]["style"]))
                     for s in scored}
            refer = {s: (pol.novelty.score(t[s]["content"], t[s]["style"], t[s]["logits"]) > pol.novelty.threshold)
                     .numpy() | (probs[s].max(1) < pol.min_confidence) for s in scored}
            nll = min(f["valid_nll"] for f in pol.clean_rows)
            label = f"{name}, {bank}, {'+'.join(inputs)} (L2 {pol.clean.l2:g}, {nll:.4f})"
            print(row(label, lambda _n, s: (probs[s], refer[s]), {s: None for s in scored}, ys, confident),
                  flush=True)


if __name__ == "__main__":
    main()
