"""Compare ways of batching in the service, side by side, on one machine at one time.

Starts every target at once (`bentoml serve`, each on its own free port, the same model
directory), then, per client concurrency, runs short POST /predict bursts against each target
in turn, round after round, so a shared machine's background load falls on all of them alike.
Reports per target and concurrency the median over rounds of: requests/s, p50 / p95 latency,
the mean forward batch, and the service's own `queue` time (Server-Timing: time in the model
call beyond the forward pass itself, i.e. what the batching mechanism costs a request).

    .venv/bin/python experiments/batching/bench_batching.py --model-dir DIR            # the three below
    .venv/bin/python experiments/batching/bench_batching.py --model-dir DIR --targets private=covid_cxr.serve.service:CovidCxr

Targets: `private` (the service: its own CorkDispatcher), `selfcall` and `composed`
(experiments/batching/batching_variants.py: BentoML's documented `@bentoml.api(batchable=True)`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # bench_service: servers and load

import bench_service as B  # noqa: E402

TARGETS = {
    "private": "covid_cxr.serve.service:CovidCxr",
    "selfcall": "experiments.batching.batching_variants:SelfCall",
    "composed": "experiments.batching.batching_variants:Composed",
}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--targets", default=",".join(f"{k}={v}" for k, v in TARGETS.items()))
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", default="16,32,48", help="requests per burst, per concurrency level")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    ap.add_argument("--images", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    targets = dict(t.split("=", 1) for t in args.targets.split(","))
    concs = [int(c) for c in args.concurrency.split(",")]
    ns = [int(n) for n in args.requests.split(",")]
    model_dir = args.model_dir.resolve()
    bodies = [B.multipart(b, f"{i}.png") for i, b in enumerate(B.load_images(args.images, 32))]
    env = {"COVID_CXR_MODEL_DIR": str(model_dir)}
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    servers = {}
    try:
        for name, svc in targets.items():
            port = B.free_port()
            log = tmp / f"bench_batching_{name}_{port}.log"
            servers[name] = (f"http://127.0.0.1:{port}", B.start_server([svc], env, port, args.threads, log), log)
        print(f"# {model_dir} | torch threads {args.threads} | {os.cpu_count()} CPUs | "
              f"COVID_CXR_BATCH_MAX_LATENCY_MS={os.environ.get('COVID_CXR_BATCH_MAX_LATENCY_MS', '(default)')}")
        for name, (url, proc, log) in servers.items():
            await B.wait_ready(url, proc, log)
            await B.load(url, bodies, 32, 4)  # warm-up
            print(f"  {name}: {targets[name]} ready ({log})")
        res: dict[str, list[dict]] = {name: [] for name in servers}
        for conc, n in zip(concs, ns):
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name, (url, _, _) in servers.items():
                    runs[name].append(await B.load(url, bodies, n, conc))
            for name, rs in runs.items():
                res[name].append({
                    "concurrency": conc, "rounds": args.rounds, "requests_per_round": n,
                    "rps": statistics.median(r["rps"] for r in rs),
                    "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                    "p95_ms": statistics.median(r["p95_ms"] for r in rs),
                    "mean_batch": statistics.mean(r["mean_batch"] for r in rs),
                    "shed": sum(r["shed"] for r in rs),
                    "server_ms": {k: statistics.median(r["server_ms"].get(k, 0.0) for r in rs)
                                  for k in rs[0]["server_ms"]},
                })
    finally:
        for _, proc, _ in servers.values():
            B.stop_server(proc)

    print(f"\n{'target':>9} {'conc':>4} {'req/s':>6} {'p50 ms':>7} {'p95 ms':>7} {'batch':>5} "
          f"{'model ms':>8} {'queue ms':>8} {'503':>4}")
    for conc_i in range(len(concs)):
        for name, rows in res.items():
            t = rows[conc_i]
            sm = t["server_ms"]
            print(f"{name:>9} {t['concurrency']:>4} {t['rps']:>6.1f} {t['p50_ms']:>7.1f} {t['p95_ms']:>7.1f} "
                  f"{t['mean_batch']:>5.1f} {sm.get('model', 0):>8.1f} {sm.get('queue', 0):>8.1f} {t['shed']:>4}")
    if args.json:
        args.json.write_text(json.dumps({"targets": targets, "results": res}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
