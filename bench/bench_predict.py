"""Benchmark `covid-cxr predict` against the bare batched forward pass, in one run.

Both sides use one loaded model, the same batch size and the same torch thread count:
  * in-process forward: `LoadedModel.predict` on the films decoded beforehand (no I/O, no decode),
    in batches of --batch-size: the ceiling;
  * predict: `predict.run_predict` (what the CLI runs after loading the model) on the folder,
    into a fresh CSV each round: scan, read, sha256, decode in the thread pool, the same forward,
    the CSV appends (and the heat maps with --heatmaps).
Rounds alternate between the two sides (a shared machine's background load hits both), and the
ratio is the median of the rounds' ratios (each round's two sides saw about the same load);
target >= 0.8, printed with whether it is met as the last line. Also reported: the share of
predict's own wall time spent in the forward pass.
Once at the end the real console script is run too (`covid-cxr predict ...` in a subprocess),
for its images/s and its wall time with start-up.

    .venv/bin/python bench/bench_predict.py                          # test model (96 px) on batch-001
    .venv/bin/python bench/bench_predict.py --image-size 224         # test model at the production size
    .venv/bin/python bench/bench_predict.py --model artifacts/model --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "service"))

SHARED = Path(os.environ.get("COVID_CXR_SHARED", ROOT.parent / "shared"))
INCOMING = SHARED / "incoming" / "batch-001"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory or BentoML tag (default: the small test model)")
    ap.add_argument("--image-size", type=int, default=96, help="test model input size (without --model)")
    ap.add_argument("--source", default=str(INCOMING))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both sides (default: predict's, all cores but one)")
    ap.add_argument("--no-overlap", action="store_true", help="decode, then forward (no overlap)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--heatmaps", action="store_true", help="predict also writes Grad-CAM PNGs")
    ap.add_argument("--no-cli", action="store_true", help="skip the console-script run")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    import torch

    from covid_cxr.model.checkpoint import load_model
    from covid_cxr.serve.predict import default_threads, resolve_model, run_predict
    from covid_cxr.serve.predictinput import collect
    from covid_cxr.evaluation.scoring import load_film

    args.threads = args.threads or default_threads()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    if args.model:
        mdir, tag = resolve_model(args.model)
    else:
        import svcmodel

        mdir = svcmodel.build_test_model(tmp / "model", image_size=args.image_size)
        tag = f"dir:{mdir}"
    model = load_model(mdir)
    from contextlib import ExitStack

    with ExitStack() as st:
        files = [it.file for it in collect([args.source], st).items]
        films, rules = zip(*(load_film(p, model.size, model.min_side) for p in files))
    x = np.stack(films)
    n, bs = len(x), args.batch_size
    print(f"{n} files from {args.source}; model {tag} ({model.meta.get('arch')} @ {model.size} px); "
          f"batch {bs}; torch threads {torch.get_num_threads()}", file=sys.stderr)
    model.predict(x[:bs], not_xray=list(rules[:bs]))  # warm-up (first-call allocations)

    def forward() -> float:
        t0 = time.perf_counter()
        for j in range(0, n, bs):
            model.predict(x[j:j + bs], not_xray=list(rules[j:j + bs]))
        return n / (time.perf_counter() - t0)

    def predict(r: int) -> tuple[float, dict]:
        out = tmp / f"round{r}.csv"
        s = run_predict([args.source], out, model, tag, heatmaps=(tmp / f"maps{r}") if args.heatmaps else None,
                        batch_size=bs, workers=args.workers, progress=False,
                        overlap=not args.no_overlap)
        assert s["scored"] == n, s
        return s["scored"] / s["wall_s"], s

    fw, pr, share = [], [], []
    for r in range(args.rounds):
        if r % 2:  # alternate the order too: neither side always runs first
            ips, last = predict(r)
            fw.append(forward())
        else:
            fw.append(forward())
            ips, last = predict(r)
        pr.append(ips)
        share.append(last["forward_s"] / last["wall_s"])
        print(f"round {r + 1}: forward {fw[-1]:.1f} images/s, predict {pr[-1]:.1f} images/s, ratio "
              f"{pr[-1] / fw[-1]:.2f} (the model's share of predict's wall: {share[-1]:.0%})", file=sys.stderr)
    res = {
        "files": n, "model": tag, "image_size": model.size, "batch_size": bs, "torch_threads": torch.get_num_threads(),
        "heatmaps": args.heatmaps, "rounds": args.rounds,
        "forward_images_per_s": round(statistics.median(fw), 1),
        "predict_images_per_s": round(statistics.median(pr), 1),
        "forward_rounds": [round(v, 1) for v in fw], "predict_rounds": [round(v, 1) for v in pr],
    }
    # paired: each round's two sides saw about the same background load
    res["ratio"] = round(statistics.median(p / f for p, f in zip(pr, fw)), 3)
    res["ratio_of_medians"] = round(res["predict_images_per_s"] / res["forward_images_per_s"], 3)
    res["forward_share_of_predict_wall"] = round(statistics.median(share), 3)
    if not args.no_cli:
        cmd = [str(Path(sys.executable).parent / "covid-cxr"), "predict", args.source, "--model", str(mdir),
               "--out", str(tmp / "cli.csv"), "--batch-size", str(bs), "--no-progress"]
        cmd += ["--threads", str(args.threads)]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        m = re.search(r"\(([\d.]+) images/s\)", p.stderr)
        res["cli"] = {"returncode": p.returncode, "images_per_s": float(m.group(1)) if m else None,
                      "wall_s_with_startup": round(wall, 2)}
        if p.returncode:
            print(p.stderr[-2000:], file=sys.stderr)
    print(f"\nforward {res['forward_images_per_s']} images/s, predict {res['predict_images_per_s']} images/s: "
          f"ratio {res['ratio']:.2f} (target >= 0.8)")
    if "cli" in res:
        print(f"console script: {res['cli']['images_per_s']} images/s while scoring, "
              f"{res['cli']['wall_s_with_startup']} s wall with start-up and model load")
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"target: predict images/s >= 0.8x in-process forward  measured: {res['ratio']:.2f}x  "
          f"{'MET' if res['ratio'] >= 0.8 else 'NOT MET'}")


if __name__ == "__main__":
    main()
