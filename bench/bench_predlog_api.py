"""What the prediction log costs the API: throughput at concurrency 8 with the log on vs off.

Starts two real `covid-cxr serve --model-dir` servers on loopback, one writing the log to a
temporary file and one with COVID_CXR_PREDICTION_LOG=off, and sends them the same bounded
request rounds in turn (the idle one waits), so both see the same background load.

    .venv/bin/python bench/bench_predlog_api.py --model-dir artifacts/model [--rounds 6 --requests 64]

Target (the last line prints it and whether it is met): throughput with the log on >= 0.95x with
it off (median of the paired rounds). Where it comes from: the README promises that writing the
log "never slows or fails a prediction"; 5 % is the allowance chosen here for what interleaved
rounds on a shared machine cannot cancel.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir: Path, log: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "COVID_CXR_PREDICTION_LOG": log, "BENTOML_DO_NOT_TRACK": "true"}
    p = subprocess.Popen([str(ROOT / ".venv/bin/covid-cxr"), "serve", "--port", str(port), "--model-dir",
                          str(model_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                         start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return p, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready")


def round_rps(url: str, bodies: list[bytes], n: int, conc: int) -> float:
    def one(i: int) -> None:
        r = client.post(url + "/predict", files={"image": ("x.png", bodies[i % len(bodies)], "image/png")})
        assert r.status_code == 200, r.text

    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=conc)) as client:
        t = time.perf_counter()
        with ThreadPoolExecutor(conc) as ex:
            list(ex.map(one, range(n)))
        return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "model")
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "incoming" / "batch-001" / "Normal")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    bodies = [p.read_bytes() for p in sorted(args.images.glob("*.png"))[:32]]
    tmp = tempfile.mkdtemp()
    on, url_on = start(args.model_dir, str(Path(tmp) / "predictions.jsonl"))
    off, url_off = start(args.model_dir, "off")
    try:
        for url in (url_on, url_off):  # warm-up
            round_rps(url, bodies, 16, args.concurrency)
        r_on, r_off = [], []
        for _ in range(args.rounds):
            r_on.append(round_rps(url_on, bodies, args.requests, args.concurrency))
            r_off.append(round_rps(url_off, bodies, args.requests, args.concurrency))
        lines = sum(1 for _ in open(Path(tmp) / "predictions.jsonl"))
        ratios = [a / b for a, b in zip(r_on, r_off)]
        print(f"concurrency {args.concurrency}, {args.rounds} interleaved rounds of {args.requests} requests")
        print(f"log on : median {statistics.median(r_on):.1f} req/s  {[round(x, 1) for x in r_on]}")
        print(f"log off: median {statistics.median(r_off):.1f} req/s  {[round(x, 1) for x in r_off]}")
        print(f"ratio on/off: median {statistics.median(ratios):.3f} (cost {100 * (1 - statistics.median(ratios)):.1f} %);"
              f" {lines} log lines written")
        ratio = statistics.median(ratios)
        print(f"target: API req/s with the prediction log on >= 0.95x off  measured: {ratio:.3f}x  "
              f"{'MET' if ratio >= 0.95 else 'NOT MET'}")
    finally:
        for p in (on, off):
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)


if __name__ == "__main__":
    main()
