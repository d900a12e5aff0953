"""Data-stage throughput on the real 6,119 images: prepare+validate vs a decode-only baseline.

    .venv/bin/python bench/bench_data.py [--repeat N] [--json out.json]

Runs in a throw-away project root (params.yaml copied, data/ symlinked, empty stats cache), so
the repository's artifacts/ and .cache/ are untouched.
- decode-only: `preprocess.open_image` + `to_gray` on every PNG, in this process, one core.
- prepare+validate: the real stage commands, `covid-cxr prepare --no-cache` then
  `covid-cxr validate` (as `dvc repro` runs them: new processes, imports included, GX Data Docs
  built), with a cold stats cache.
The page cache is warmed first so both sides read from memory. Target: ratio >= 0.5.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from covid_cxr.imagecheck import data_image_files  # noqa: E402
from covid_cxr.preprocess import open_image, to_gray  # noqa: E402


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("covid-cxr")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "covid_cxr.cli"]


def decode_only(files: list[Path]) -> float:
    t = time.perf_counter()
    for p in files:
        to_gray(open_image(p))
    return time.perf_counter() - t


def stage(args: list[str], root: Path) -> float:
    env = {**os.environ, "COVID_CXR_ROOT": str(root)}
    t = time.perf_counter()
    r = subprocess.run(cli() + args, cwd=root, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"covid-cxr {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="alternating rounds (report the median)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()

    data = REPO / "data"
    files = [f.path for f in data_image_files(data)]
    if not files:
        raise SystemExit("data/ is empty: dvc pull first")
    n = len(files)
    for p in files:  # warm the page cache
        p.read_bytes()

    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        os.symlink(data.resolve(), root / "data")
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        for _ in range(a.repeat):
            shutil.rmtree(root / ".cache", ignore_errors=True)
            r = {"load_avg_1m": os.getloadavg()[0]}
            r["decode_s"] = decode_only(files)
            r["prepare_s"] = stage(["prepare", "--no-cache"], root)
            r["validate_s"] = stage(["validate"], root)
            rounds.append(r)
        # once: prepare again with a warm stats cache (the retraining case: only new files decode)
        stage(["prepare"], root)  # fills the cache
        warm = stage(["prepare"], root)
        manifest_rows = sum(1 for _ in open(root / "artifacts/data/manifest.csv")) - 1

    med = {k: statistics.median(r[k] for r in rounds) for k in ("decode_s", "prepare_s", "validate_s")}
    decode_ips = n / med["decode_s"]
    pv_s = med["prepare_s"] + med["validate_s"]
    pv_ips = n / pv_s
    out = {
        "images": n,
        "manifest_rows": manifest_rows,
        "rounds": rounds,
        "decode_only_img_per_s": round(decode_ips, 1),
        "prepare_s": round(med["prepare_s"], 2),
        "validate_s": round(med["validate_s"], 2),
        "prepare_validate_img_per_s": round(pv_ips, 1),
        "ratio": round(pv_ips / decode_ips, 3),
        "prepare_warm_cache_s": round(warm, 2),
        "workers": int(os.environ.get("COVID_CXR_WORKERS", "1")),
        "cpus": os.cpu_count(),
    }
    print(f"images                      {n}  (load avg at start {rounds[0]['load_avg_1m']:.2f}, {os.cpu_count()} CPUs)")
    print(f"decode-only (1 core)        {med['decode_s']:6.2f} s  {decode_ips:7.1f} img/s")
    print(f"prepare --no-cache          {med['prepare_s']:6.2f} s")
    print(f"validate (GX + Data Docs)   {med['validate_s']:6.2f} s")
    print(f"prepare+validate            {pv_s:6.2f} s  {pv_ips:7.1f} img/s")
    print(f"ratio                       {out['ratio']:.2f}x decode-only  (target >= 0.5: "
          f"{'met' if out['ratio'] >= 0.5 else 'NOT met'})")
    print(f"prepare, warm stats cache   {warm:6.2f} s")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
