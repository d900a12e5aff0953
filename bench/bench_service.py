"""Benchmark the prediction service against the same model run in-process.

Starts a real `bentoml serve` on loopback (a free port) and loads the same model in this
process with the same torch thread count. Then:
  * single-request latency: sequential POST /predict (stdlib keep-alive client), each one
    paired with one raw in-process forward pass (batch 1, pre-decoded): p50 / p95 and the
    p50 ratio (target <= 1.5x);
  * throughput at client concurrency 1, 4 and 8 (requests/s), in interleaved rounds with the
    in-process batched forward throughput at batch = concurrency (images/s) and the same
    including PNG decode + resize ("pipeline"); ratio API / in-process (target >= 0.8 at 8).
The server is idle while the in-process side runs, and vice versa. Interleaving matters on a
shared machine: both sides of each ratio see the same background load. Every loop is
bounded; nothing leaves loopback. The service's Server-Timing header splits its own time
into decode / queue / model.

    .venv/bin/python bench/bench_service.py                        # production Bento, else artifacts/model
    .venv/bin/python bench/bench_service.py --model-dir artifacts/model
    .venv/bin/python bench/bench_service.py --bento covid_cxr:<version> --json out.json
    .venv/bin/python bench/bench_service.py --model-dir D --service bench.batching_variants:SelfCall \
        --concurrency 1,4,16 --no-inproc          # another service definition, API figures only
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from covid_cxr.config import CLASSES, Paths  # noqa: E402

INCOMING = Path(os.environ.get("COVID_CXR_SHARED", Path(__file__).resolve().parents[1].parent / "shared")) / "incoming" / "batch-001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_target(args) -> tuple[list[str], dict[str, str], Path, str]:
    """-> (serve target args, extra env, model directory for the in-process side, label)."""
    if args.model_dir:
        d = Path(args.model_dir).resolve()
        return [args.service], {"COVID_CXR_MODEL_DIR": str(d)}, d, f"{args.service} | dir {d}"
    import bentoml

    tag = args.bento
    if not tag:
        from covid_cxr.release.promotion import production

        prod = production()
        if prod:
            tag = prod["bento"]
        elif (Paths().model_dir / "model.json").is_file():
            d = Paths().model_dir.resolve()
            return ["covid_cxr.serve.service:CovidCxr"], {"COVID_CXR_MODEL_DIR": str(d)}, d, f"dir {d}"
        else:
            sys.exit("nothing to benchmark: no production Bento and no artifacts/model (use --model-dir)")
    bento = bentoml.get(tag)
    model_tag = next(iter(bento.info.all_models)).tag
    return [str(bento.tag)], {}, Path(bentoml.models.get(model_tag).path), f"bento {bento.tag}"


def load_images(src: Path | None, n: int) -> list[bytes]:
    dirs = [src] if src else [INCOMING, Paths().dataset]
    for d in dirs:
        if d and d.is_dir():
            files = sorted(d.rglob("*.png"))
            if files:
                step = max(1, len(files) // n)
                return [f.read_bytes() for f in files[::step][:n]]
    sys.exit(f"no PNG images found in {dirs}")


def start_server(target: list[str], env_extra: dict, port: int, threads: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("COVID_CXR_MODEL_DIR", "COVID_CXR_API_TOKEN")}
    env.update(env_extra)
    env.update({"BENTOML_DO_NOT_TRACK": "true", "COVID_CXR_TORCH_THREADS": str(threads)})
    cmd = [sys.executable, "-m", "bentoml", "serve", *target, "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


async def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    import httpx

    t0 = time.monotonic()
    async with httpx.AsyncClient() as c:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                sys.exit(f"server exited:\n{log.read_text()[-3000:]}")
            try:
                if (await c.get(f"{url}/readyz", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    sys.exit(f"server not ready in {timeout}s:\n{log.read_text()[-3000:]}")


BOUNDARY = "benchcovidcxr"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(data: bytes, name: str = "x.png") -> bytes:
    """One pre-encoded multipart body per image, so the client spends no CPU re-encoding."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def server_timing(header: str, parts: dict[str, list[float]]) -> None:
    for item in header.split(","):
        name, _, dur = item.strip().partition(";dur=")
        if dur:
            parts.setdefault(name, []).append(float(dur))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def latency(port: int, bodies: list[bytes], n: int, inproc: "InProcess | None") -> dict:
    """n sequential requests on one keep-alive connection (stdlib client: minimal client cost),
    each paired with one raw in-process forward pass right after it: on a shared machine both
    halves of a pair see the same load, so the per-pair ratio is the robust number."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    lat: list[float] = []
    raw: list[float] = []
    parts: dict[str, list[float]] = {}
    try:
        for i in range(n):
            t = time.perf_counter()
            conn.request("POST", "/predict", body=bodies[i % len(bodies)], headers={"Content-Type": CTYPE})
            r = conn.getresponse()
            body = r.read()
            lat.append(time.perf_counter() - t)
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {body[:300]!r}")
            server_timing(r.getheader("server-timing") or "", parts)
            if inproc is not None:
                raw.append(inproc.forward_once(i))
    finally:
        conn.close()
    if inproc is None:
        return {"p50_ms": 1000 * pct(lat, 0.5), "p95_ms": 1000 * pct(lat, 0.95),
                "server_ms": {k: statistics.median(v) for k, v in parts.items()}}
    return {"p50_ms": 1000 * pct(lat, 0.5), "p95_ms": 1000 * pct(lat, 0.95),
            "raw_forward_p50_ms": 1000 * pct(raw, 0.5),
            "p50_over_raw": pct(lat, 0.5) / pct(raw, 0.5),
            "paired_ratio_median": statistics.median(a / b for a, b in zip(lat, raw)),
            "server_ms": {k: statistics.median(v) for k, v in parts.items()}}


async def load(url: str, bodies: list[bytes], n: int, conc: int) -> dict:
    """n POST /predict with `conc` in flight; -> throughput and latencies of the answered ones,
    batch sizes seen, and how many the service shed (503 overloaded)."""
    import httpx

    lat: list[float] = []
    sizes: list[int] = []
    shed: list[int] = []
    parts: dict[str, list[float]] = {}
    nxt = 0
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def worker():
            nonlocal nxt
            while nxt < n:
                i = nxt
                nxt += 1
                t = time.perf_counter()
                r = await c.post("/predict", content=bodies[i % len(bodies)], headers={"Content-Type": CTYPE})
                if r.status_code == 503 and r.json().get("error") == "overloaded":
                    shed.append(i)  # the batching queue gave up on it (COVID_CXR_BATCH_MAX_LATENCY_MS)
                    continue
                lat.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                assert r.json()["label"] in CLASSES
                sizes.append(int(r.headers.get("x-batch-size", 1)))
                server_timing(r.headers.get("server-timing", ""), parts)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"n": n, "rps": len(lat) / wall, "shed": len(shed), "p50_ms": 1000 * lat[len(lat) // 2],
            "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "mean_batch": statistics.mean(sizes), "max_batch": max(sizes),
            "server_ms": {k: statistics.median(v) for k, v in parts.items()}}


class InProcess:
    """The same model, same preprocessing, same thread count, no HTTP."""

    def __init__(self, model_dir: Path, threads: int, images: list[bytes]):
        import torch

        from covid_cxr.model.checkpoint import load_model
        from covid_cxr.data.preprocess import load_gray

        torch.set_num_threads(threads)
        self.model = load_model(model_dir)
        self.images = images
        self.load_gray = load_gray
        self.grays = np.stack([load_gray(b, self.model.size) for b in images])
        for _ in range(3):
            self.model.predict(self.grays[:8])

    def forward_once(self, i: int) -> float:
        x = self.grays[i % len(self.grays)][None]
        t = time.perf_counter()
        self.model.predict(x)
        return time.perf_counter() - t

    def forward_ips(self, batch: int, n_images: int) -> float:
        reps = max(2, n_images // batch)
        idx = np.arange(batch)
        t = time.perf_counter()
        for r in range(reps):
            self.model.predict(self.grays[(idx + r * batch) % len(self.grays)])
        return reps * batch / (time.perf_counter() - t)

    def pipeline_ips(self, batch: int, n_images: int) -> float:
        reps = max(2, n_images // batch)
        t = time.perf_counter()
        for r in range(reps):
            x = np.stack([self.load_gray(self.images[(r * batch + j) % len(self.images)], self.model.size)
                          for j in range(batch)])
            self.model.predict(x)
        return reps * batch / (time.perf_counter() - t)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="serve this model directory (COVID_CXR_MODEL_DIR)")
    ap.add_argument("--bento", help="serve this Bento tag (default: the production one)")
    ap.add_argument("--images", type=Path, help="folder of PNGs (default: the incoming batch)")
    ap.add_argument("--requests", type=int, default=96, help="requests per concurrency level (all rounds)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved API / in-process rounds per level")
    ap.add_argument("--latency-requests", type=int, default=60)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                    help="torch threads, both sides (default: the service's default, all cores but one)")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--service", default="covid_cxr.serve.service:CovidCxr",
                    help="the service to serve with --model-dir (import path)")
    ap.add_argument("--no-inproc", action="store_true", help="API figures only (no in-process reference)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    target, env_extra, model_dir, label = pick_target(args)
    images = load_images(args.images, 32)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_service_{port}.log"
    print(f"# {label} | {len(images)} images | torch threads {args.threads} | {os.cpu_count()} CPUs | log {log}")
    proc = start_server(target, env_extra, port, args.threads, log)
    res: dict = {"target": label, "threads": args.threads}
    try:
        await wait_ready(url, proc, log)
        inproc = None if args.no_inproc else InProcess(model_dir, args.threads, images)
        res["image_size"] = json.loads((model_dir / "model.json").read_text())["image_size"]
        bodies = [multipart(b, f"{i}.png") for i, b in enumerate(images)]
        await load(url, bodies, 32, 4)  # warm-up: connections, allocator, dispatcher latency model

        res["latency"] = latency(port, bodies, args.latency_requests, inproc)
        res["throughput"] = []
        rounds = max(1, args.rounds)
        for conc in [int(c) for c in args.concurrency.split(",")]:
            # Interleaved rounds (API burst, then the same number of images in-process), so that
            # both sides of each ratio see the same background load; report medians over rounds.
            n = max(args.requests // rounds, 4 * conc)
            api_r, fwd_r, pipe_r, p50s, p95s, batches, maxb, shed = [], [], [], [], [], [], 0, 0
            for _ in range(rounds):
                api = await load(url, bodies, n, conc)
                api_r.append(api["rps"])
                p50s.append(api["p50_ms"])
                p95s.append(api["p95_ms"])
                batches.append(api["mean_batch"])
                maxb = max(maxb, api["max_batch"])
                shed += api["shed"]
                if inproc is not None:
                    fwd_r.append(inproc.forward_ips(conc, n))
                    pipe_r.append(inproc.pipeline_ips(conc, n))
            t = {"concurrency": conc, "rounds": rounds, "requests_per_round": n,
                 "api_rps": statistics.median(api_r), "api_p50_ms": statistics.median(p50s),
                 "api_p95_ms": statistics.median(p95s),
                 "mean_batch": statistics.mean(batches), "max_batch": maxb, "shed": shed}
            if inproc is not None:
                t.update({"inproc_forward_ips": statistics.median(fwd_r),
                          "inproc_pipeline_ips": statistics.median(pipe_r),
                          "ratio_forward": statistics.median(a / b for a, b in zip(api_r, fwd_r)),
                          "ratio_pipeline": statistics.median(a / b for a, b in zip(api_r, pipe_r))})
            res["throughput"].append(t)
    finally:
        stop_server(proc)

    L = res["latency"]
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    print(f"\nsingle request: p50 {L['p50_ms']:.1f} ms, p95 {L['p95_ms']:.1f} ms", end="")
    if "raw_forward_p50_ms" in L:
        print(f" | one raw forward (batch 1) p50 {L['raw_forward_p50_ms']:.1f} ms | p50/raw = "
              f"{L['p50_over_raw']:.2f}x, median paired ratio {L['paired_ratio_median']:.2f}x (target <= 1.5x)", end="")
    print()
    sm = L["server_ms"]
    if sm:
        inside = sum(sm.values())
        print("  inside the service (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in sm.items())
              + f"; the rest (HTTP, BentoML, multipart, client): {L['p50_ms'] - inside:.1f}")
    inproc = "inproc_forward_ips" in res["throughput"][0]
    print(f"\n{'conc':>4} {'API req/s':>10} {'p50 ms':>7} {'p95 ms':>7} {'batch':>9} {'503':>4}"
          + (f" | {'fwd img/s':>9} {'API/fwd':>7} | {'pipe img/s':>10} {'API/pipe':>8}" if inproc else ""))
    for t in res["throughput"]:
        print(f"{t['concurrency']:>4} {t['api_rps']:>10.1f} {t['api_p50_ms']:>7.1f} {t['api_p95_ms']:>7.1f} "
              f"{t['mean_batch']:>5.1f}/{t['max_batch']:<3} {t['shed']:>4}"
              + (f" | {t['inproc_forward_ips']:>9.1f} {t['ratio_forward']:>7.2f} | "
                 f"{t['inproc_pipeline_ips']:>10.1f} {t['ratio_pipeline']:>8.2f}" if inproc else ""))
    if inproc:
        last = res["throughput"][-1]
        print(f"\n(ratios: median over {last['rounds']} interleaved rounds of API vs in-process)")
        print(f"API / in-process batched forward at concurrency {last['concurrency']}: {last['ratio_forward']:.2f} "
              f"(target >= 0.8); vs in-process decode+forward: {last['ratio_pipeline']:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
