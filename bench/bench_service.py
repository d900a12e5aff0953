"""The prediction service at the speed of the machine, in little memory: every figure beside its target.

Starts a real `covid-cxr serve --model-dir` (the service's params.yaml `serve:` settings, its own
thread and precision choices) on loopback, and in this process the bare body and one model. In one run:
  * the bare MobileNetV2 body at the model's size, batch 16, channels_last, all cores: float32 and
    bfloat16 img/s and their ratio (bfloat16 only where the CPU has it natively);
  * single-request latency: sequential POST /predict on one keep-alive connection, against one
    in-process forward pass (batch 1, the precision the service runs, pre-decoded films);
  * API throughput at 1, 4 and 8 clients (req/s), rounds interleaved with the bare body so both
    see the same background load;
  * the summed RSS of every process of the service, idle and every 30 s over `--soak-minutes` of 8
    clients, with the errors seen (any answer but 200).
The server is idle while this process measures, and vice versa. Nothing leaves loopback.

Targets (issue "Serve at the speed of the machine, in a third of the memory"):
  API req/s at 8 clients >= 0.7 x the bare body's best throughput; p50 <= 1.3 x one forward pass;
  RSS idle <= 800 MB, after the soak <= 900 MB, growth over its last 5 minutes <= 1 %; 0 errors.

    .venv/bin/python bench/bench_service.py [--model-dir artifacts/model] [--soak-minutes 10]
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

INCOMING = Path(os.environ.get("COVID_CXR_SHARED", ROOT.parent / "shared")) / "incoming" / "batch-001"
BOUNDARY = "benchcovidcxr"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_images(n: int) -> list[bytes]:
    for d in (INCOMING, Paths(ROOT).dataset):
        files = sorted(d.rglob("*.png")) if d.is_dir() else []
        if files:
            step = max(1, len(files) // n)
            return [f.read_bytes() for f in files[::step][:n]]
    sys.exit("no PNG images found")


def multipart(data: bytes, name: str) -> bytes:
    """One pre-encoded multipart body per image, so the client spends no CPU re-encoding."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def rss_mb(pid: int) -> float:
    """The summed resident memory of a process and all its descendants, MB."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def serve(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("COVID_CXR_API_TOKEN", "COVID_CXR_TORCH_THREADS")}
    env.update(BENTOML_DO_NOT_TRACK="true", COVID_CXR_PREDICTION_LOG=str(log.with_suffix(".jsonl")))
    return subprocess.Popen([str(Path(sys.executable).parent / "covid-cxr"), "serve", "--model-dir", str(model_dir),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


async def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    async with httpx.AsyncClient() as c:
        for _ in range(480):
            if proc.poll() is not None:
                sys.exit(f"server exited:\n{log.read_text()[-3000:]}")
            try:
                if (await c.get(f"{url}/readyz", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    sys.exit(f"server not ready:\n{log.read_text()[-3000:]}")


def latency(port: int, bodies: list[bytes], n: int) -> list[float]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = []
    try:
        for i in range(n):
            t = time.perf_counter()
            conn.request("POST", "/predict", body=bodies[i % len(bodies)], headers={"Content-Type": CTYPE})
            r = conn.getresponse()
            body = r.read()
            out.append(time.perf_counter() - t)
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {body[:300]!r}")
    finally:
        conn.close()
    return out


async def load(url: str, bodies: list[bytes], conc: int, *, n: int | None = None, seconds: float | None = None,
               tick=None) -> dict:
    """`conc` clients posting /predict: `n` requests in all, or for `seconds` (calling `tick()` as it goes)."""
    import httpx

    done, errors, nxt = [], [], 0
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        async def client():
            nonlocal nxt
            while (n is not None and nxt < n) or (seconds is not None and time.perf_counter() - t0 < seconds):
                i = nxt
                nxt += 1
                ts = time.perf_counter()
                try:
                    r = await c.post("/predict", content=bodies[i % len(bodies)], headers={"Content-Type": CTYPE})
                    ok = r.status_code == 200 and r.json()["label"] in CLASSES
                except Exception as e:  # a dropped connection is an error too
                    ok, r = False, e
                (done if ok else errors).append(time.perf_counter() - ts)
                if tick is not None:
                    tick()

        await asyncio.gather(*(client() for _ in range(conc)))
    wall = time.perf_counter() - t0
    return {"rps": len(done) / wall, "errors": len(errors), "n": len(done) + len(errors),
            "p50_ms": 1000 * statistics.median(done) if done else None}


def body_ips(net, size: int, variant: str, reps: int = 10) -> float:
    """The bare body (no style statistics, no head), batch 16, channels_last, all cores:
    `float32`, `float32 folded` (BatchNorm folded into the convolutions), `bfloat16 autocast` (as
    training runs it) or `bfloat16 folded` (folded, bfloat16 weights: the fastest form measured here).
    bench_bf16_parity.py uses it too."""
    import copy

    import torch

    x = torch.randn(16, 3, size, size).contiguous(memory_format=torch.channels_last)
    body, ctx = net.body, torch.autocast("cpu", enabled=False)
    if variant == "bfloat16 autocast":
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    elif variant.endswith("folded"):
        from torch.fx.experimental.optimization import fuse

        body = fuse(copy.deepcopy(net.body).eval()).to(memory_format=torch.channels_last)
        if variant.startswith("bfloat16"):
            body, x = body.to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.inference_mode(), ctx:
        for _ in range(2):
            body(x)
        t = time.perf_counter()
        for _ in range(reps):
            body(x)
    return reps * 16 / (time.perf_counter() - t)


def line(name: str, value: str, target: str, ok: bool) -> str:
    return f"  {name:<44} {value:>16}   target {target:<22} {'MET' if ok else 'NOT MET'}"


async def main() -> None:
    import torch

    from covid_cxr.data.preprocess import load_gray
    from covid_cxr.model.checkpoint import load_model
    from covid_cxr.model.checkpoint import load_meta
    from covid_cxr.model.precision import cpu_has_bf16, serve_precision
    from covid_cxr.config import load_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "model")
    ap.add_argument("--soak-minutes", type=float, default=10.0)
    ap.add_argument("--requests", type=int, default=96, help="requests per client count and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    precision = serve_precision(load_meta(a.model_dir)["inference"], load_params(ROOT / "params.yaml")["serve"]["precision"])
    model = load_model(a.model_dir, precision=precision)
    images = load_images(32)
    grays = np.stack([load_gray(b, model.size) for b in images])
    bodies = [multipart(b, f"{i}.png") for i, b in enumerate(images)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_service_{port}.log"
    print(f"# {a.model_dir} | {threads} cores | native bf16 {cpu_has_bf16()} | served in {precision} | log {log}")
    proc = serve(a.model_dir, port, log)
    res: dict = {"precision": precision, "threads": threads}
    try:
        await wait_ready(url, proc, log)
        await load(url, bodies, 4, n=48)                     # warm-up
        time.sleep(5)
        res["rss_idle_mb"] = rss_mb(proc.pid)

        lat = latency(port, bodies, 60)
        fwd = []
        for i in range(60):
            t = time.perf_counter()
            model.predict(grays[i % len(grays)][None])
            fwd.append(time.perf_counter() - t)
        res["p50_ms"], res["forward_ms"] = 1000 * statistics.median(lat), 1000 * statistics.median(fwd)

        variants = ["float32", "bfloat16 autocast", "bfloat16 folded"] if cpu_has_bf16() else ["float32"]
        res["api"], ips = {}, {v: [] for v in variants}
        for conc in (1, 4, 8):
            rps = []
            for _ in range(a.rounds):
                rps.append((await load(url, bodies, conc, n=max(a.requests // a.rounds, 4 * conc)))["rps"])
                if conc == 8:   # the body between API rounds: both see the same background load
                    for v in variants:
                        ips[v].append(body_ips(model.net, model.size, v))
            res["api"][conc] = statistics.median(rps)
        res["body_ips"] = {k: statistics.median(v) for k, v in ips.items() if v}

        samples: list[tuple[float, float]] = []
        t0, last = time.monotonic(), [0.0]

        def tick():
            now = time.monotonic()
            if now - last[0] >= 30:
                last[0] = now
                samples.append((now - t0, rss_mb(proc.pid)))

        soak = await load(url, bodies, 8, seconds=60 * a.soak_minutes, tick=tick)
        samples.append((time.monotonic() - t0, rss_mb(proc.pid)))
        res["soak"] = {"minutes": a.soak_minutes, "requests": soak["n"], "errors": soak["errors"],
                       "rps": soak["rps"], "rss_mb": samples}
    finally:
        stop(proc)

    best = max(res["body_ips"].values())
    rss = [m for _, m in res["soak"]["rss_mb"]]
    tail = [m for t, m in res["soak"]["rss_mb"] if t >= res["soak"]["rss_mb"][-1][0] - 300]
    growth = (tail[-1] - tail[0]) / tail[0] if tail and tail[0] else 0.0
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    print(f"\nbare body, batch 16, {threads} threads: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in res["body_ips"].items())
          + (f" (bf16 autocast / f32 = {res['body_ips']['bfloat16 autocast'] / res['body_ips']['float32']:.2f})"
             if "bfloat16 autocast" in res["body_ips"] else ""))
    print("API req/s: " + ", ".join(f"{c} clients {v:.1f}" for c, v in res["api"].items()))
    print(f"RSS over the soak (MB, every 30 s): {' '.join(f'{m:.0f}' for m in rss)}")
    print()
    plain = max(v for k, v in res["body_ips"].items() if k != "bfloat16 folded")
    print(line("API req/s at 8 clients / bare body (autocast)", f"{res['api'][8]:.1f} / {plain:.1f} = "
               f"{res['api'][8] / plain:.2f}", ">= 0.70", res["api"][8] / plain >= 0.7))
    print(line("API req/s at 8 clients / bare body best", f"{res['api'][8]:.1f} / {best:.1f} = {res['api'][8] / best:.2f}",
               ">= 0.70", res["api"][8] / best >= 0.7))
    print(line("single-request p50 / one forward pass", f"{res['p50_ms']:.1f} / {res['forward_ms']:.1f} ms = "
               f"{res['p50_ms'] / res['forward_ms']:.2f}", "<= 1.30", res["p50_ms"] / res["forward_ms"] <= 1.3))
    print(line("summed RSS, idle", f"{res['rss_idle_mb']:.0f} MB", "<= 800 MB", res["rss_idle_mb"] <= 800))
    print(line(f"summed RSS after {a.soak_minutes:g} min of 8 clients", f"{rss[-1]:.0f} MB", "<= 900 MB", rss[-1] <= 900))
    print(line("RSS growth over the last 5 minutes", f"{100 * growth:.2f} %", "<= 1 %", growth <= 0.01))
    print(line(f"errors in {res['soak']['requests']} requests at 8 clients", str(res["soak"]["errors"]), "0",
               res["soak"]["errors"] == 0))


if __name__ == "__main__":
    asyncio.run(main())
