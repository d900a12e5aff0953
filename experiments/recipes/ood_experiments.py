"""One row of the trust-outside-the-training-sources experiment table.

Trains with params.yaml plus overrides, into its own folder (the pipeline's artifacts are not
touched), then scores the test split and every external group through the same code as the
`evaluate` and `external` stages, and prints one markdown row (also appended to
.cache/experiments/results.jsonl).

    .venv/bin/python experiments/recipes/ood_experiments.py --name base-ls0 \
        -S train.label_smoothing=0 -S train.augment.acquisition.jpeg.p=0 [--profile probe]

Thresholds (temperature, novelty, low confidence) are fitted on valid by `train`, as in the
pipeline; external films are only scored.
"""
from __future__ import annotations

import argparse
import json
import time

import yaml

from covid_cxr.config import Paths, load_params


def override(params: dict, dotted: str) -> None:
    key, _, raw = dotted.partition("=")
    *parents, leaf = key.split(".")
    d = params
    for k in parents:
        d = d.setdefault(k, {})
    d[leaf] = yaml.safe_load(raw)


def acquisition_in_stage(which: str) -> None:
    """Experiment only: keep the acquisition ops in one resizing stage, switch them off in the other.

    `train` builds one image DataLoaders per stage (first the `size` epochs, then the `final_size`
    ones), so the n-th call of `image_dls` is the n-th stage.
    """
    import copy

    from covid_cxr.model import train as train_mod

    real, calls = train_mod.image_dls, []

    def image_dls(cache, labels, tr, va, cfg, norm, seed=0):
        calls.append(seed)
        keep = (len(calls) == 1) == (which == "first")
        if not keep:
            cfg = copy.deepcopy(cfg)
            for spec in cfg["augment"]["acquisition"].values():
                spec["p"] = 0.0
        print(f"  [experiment] stage {len(calls)}: acquisition ops {'on' if keep else 'off'}")
        return real(cache, labels, tr, va, cfg, norm, seed)

    train_mod.image_dls = image_dls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--profile", default="probe")
    ap.add_argument("-S", dest="sets", action="append", default=[], help="params override key=value (YAML value)")
    ap.add_argument("--all-off", action="store_true", help="switch every acquisition op off first")
    ap.add_argument("--acq-stages", choices=["all", "first", "final"], default="all",
                    help="which resizing stages get the acquisition ops (first: the 128 px epochs only; "
                         "final: the final-size epochs only)")
    args = ap.parse_args()

    from covid_cxr.evaluation.evaluate import predict_split, score
    from covid_cxr.evaluation.external import external
    from covid_cxr.model.train import train

    paths = Paths()
    params = load_params(paths.root / "params.yaml")
    params["train"]["profile"] = args.profile
    if args.all_off:
        for spec in params["train"]["augment"]["acquisition"].values():
            spec["p"] = 0.0
    for s in args.sets:
        override(params, s)
    if args.acq_stages != "all":
        acquisition_in_stage(args.acq_stages)
    out = paths.cache.parent / "experiments" / args.name
    paths.model_dir = out / "model"
    paths.eval_dir = out / "eval"
    paths.train_curves = out / "train"
    t0 = time.perf_counter()
    meta = train(paths, params)
    t_train = time.perf_counter() - t0
    m = score(predict_split(paths.model_dir, paths, "test"), int(params["evaluate"]["ece_bins"]))
    ext = external(paths, params)["groups"]
    row = {"name": args.name, "profile": args.profile, "sets": args.sets, "all_off": args.all_off,
           "acq_stages": args.acq_stages,
           "train_s": round(t_train), "test": {k: m[k] for k in ("accuracy", "covid_recall", "ece_after", "flagged",
                                                                 "flagged_by_reason")},
           "temperature": meta["temperature"], "external": ext}
    rp = paths.cache.parent / "experiments" / "results.jsonl"
    with open(rp, "a") as f:
        f.write(json.dumps(row) + "\n")
    u, tb, on = ext["unseen_hospital_normal"], ext["tuberculosis"], ext["other_normal"]
    print("| name | test acc | COVID rec | ECE | test flagged | unseen right | unseen flagged | unseen conf-wrong "
          "| TB flagged | TB conf-wrong | other right | train s |")
    print(f"| {args.name} | {m['accuracy']:.4f} | {m['covid_recall']:.4f} | {m['ece_after']:.4f} | {m['flagged']:.3f} "
          f"| {u['right']:.3f} | {u['flagged']:.3f} | {u['confident_wrong']:.3f} | {tb['flagged']:.3f} "
          f"| {tb['confident_wrong']:.3f} | {on['right']:.3f} | {t_train:.0f} |")


if __name__ == "__main__":
    main()
