"""Accuracy of a running server on a labelled folder (flat `<Class>/*` or Kaggle layout).

    covid-cxr serve --port 3000 &     # the production Bento
    .venv/bin/python experiments/api_accuracy/api_accuracy.py ../shared/incoming/batch-001 --url http://127.0.0.1:3000

Posts every image to /predict (one request each, as a client would), prints accuracy, COVID
recall, the confusion matrix, how many were flagged out-of-distribution, and the slowest calls.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request
import uuid
from pathlib import Path

from covid_cxr.config import CLASSES

ALIASES = {c.lower().replace(" ", ""): c for c in CLASSES}


def post(url: str, path: Path, token: str | None) -> dict:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{url}/predict", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    a = ap.parse_args()
    token = os.environ.get("COVID_CXR_API_TOKEN")
    files = []
    for d in sorted(p for p in a.folder.rglob("*") if p.is_dir()):
        cls = ALIASES.get(d.name.lower().replace(" ", "").replace("_", "").replace("-", ""))
        if cls is None and d.name == "images":
            cls = ALIASES.get(d.parent.name.lower().replace(" ", ""))
        if cls:
            files += [(f, cls) for f in sorted(d.iterdir()) if f.is_file()]
    cm = {t: {p: 0 for p in CLASSES} for t in CLASSES}
    ood, lat, model = 0, [], None
    for f, cls in files:
        t = time.perf_counter()
        r = post(a.url, f, token)
        lat.append((time.perf_counter() - t, f.name))
        cm[cls][r["label"]] += 1
        ood += not r["in_distribution"]
        model = r.get("model")
    n = len(files)
    correct = sum(cm[c][c] for c in CLASSES)
    covid = sum(cm["COVID"].values())
    print(f"model {model}: {n} images from {a.folder}")
    print(f"accuracy {correct / n:.4f} ({correct}/{n})   COVID recall {cm['COVID']['COVID'] / max(covid, 1):.4f}"
          f"   flagged out-of-distribution {ood}")
    print(f"{'true / pred':<18}" + "".join(f"{c:>17}" for c in CLASSES))
    for t in CLASSES:
        print(f"{t:<18}" + "".join(f"{cm[t][p]:>17}" for p in CLASSES))
    lat.sort()
    print(f"latency p50 {lat[n // 2][0] * 1000:.0f} ms, max {lat[-1][0] * 1000:.0f} ms ({lat[-1][1]})")


if __name__ == "__main__":
    main()
