"""Data-stage throughput on the real 6,119 images: prepare+validate vs a decode-only baseline.

    .venv/bin/python bench/bench_data.py [--repeat N] [--json out.json]

Runs in a throw-away project root (params.yaml copied, data/ symlinked, empty stats cache), so
the repository's artifacts/ and .cache/ are untouched.
- decode-only: `preprocess.open_image` + `to_gray` on every PNG (a full decode, nothing else),
  in this process (1 proc) and in a fork pool of N processes run exactly as `prepare` runs its own
  (same executor, chunk size and process count; N = filestats.default_workers()).
- prepare+validate: the real stage commands, `covid-cxr prepare --no-cache` then
  `covid-cxr validate` (as `dvc repro` runs them: new processes, imports included, GX Data Docs
  built), with a cold stats cache; prepare with N decode processes and with COVID_CXR_WORKERS=1.
Rounds alternate the measurements; the page cache is warmed first so all read from memory.
Target: prepare+validate throughput >= 0.5x a plain decode-only loop (1 process), the comparison
it leads with; the stricter equal-process ratios are printed beside it. The last line prints the
target and whether it is met.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from covid_cxr.data.filestats import default_workers  # noqa: E402
from covid_cxr.data.layouts import data_image_files  # noqa: E402
from covid_cxr.data.pool import POOL_CHUNK as CHUNK  # noqa: E402
from covid_cxr.data.preprocess import open_image, to_gray  # noqa: E402


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("covid-cxr")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "covid_cxr.cli"]


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_children() -> float:  # every finished descendant, decode processes included
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _decode(p: Path) -> tuple[int, ...]:
    return to_gray(open_image(p)).shape


def decode_only(files: list[Path], workers: int = 1) -> tuple[float, float]:
    """(wall s, CPU s, pool processes included) of a full decode of every file."""
    c, t = cpu_self() + cpu_children(), time.perf_counter()
    if workers == 1:
        shapes = [_decode(p) for p in files]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            shapes = list(pool.map(_decode, files, chunksize=CHUNK))
    assert len(shapes) == len(files) and all(len(s) == 2 for s in shapes)
    return time.perf_counter() - t, cpu_self() + cpu_children() - c


def stage(args: list[str], root: Path, **env_extra: str) -> tuple[float, float]:
    """(wall s, CPU s) of one `covid-cxr` command in a new process."""
    env = {**os.environ, "COVID_CXR_ROOT": str(root), **env_extra}
    c, t = cpu_children(), time.perf_counter()
    r = subprocess.run(cli() + args, cwd=root, env=env, capture_output=True, text=True)
    dt, dc = time.perf_counter() - t, cpu_children() - c
    if r.returncode != 0:
        raise SystemExit(f"covid-cxr {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return dt, dc


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
        workers = default_workers()
        for _ in range(a.repeat):
            shutil.rmtree(root / ".cache", ignore_errors=True)
            r = {"load_avg_1m": os.getloadavg()[0]}
            r["decode_s"], r["decode_cpu_s"] = decode_only(files, workers)
            r["prepare_s"], r["prepare_cpu_s"] = stage(["prepare", "--no-cache"], root)
            r["validate_s"], r["validate_cpu_s"] = stage(["validate"], root)
            r["decode_1proc_s"], r["decode_1proc_cpu_s"] = decode_only(files, 1)
            r["prepare_1proc_s"], r["prepare_1proc_cpu_s"] = stage(["prepare", "--no-cache"], root, COVID_CXR_WORKERS="1")
            rounds.append(r)
        # once: prepare again with a warm stats cache (the retraining case: only new files decode)
        stage(["prepare"], root)  # fills the cache
        warm = stage(["prepare"], root)[0]
        manifest_rows = sum(1 for _ in open(root / "artifacts/data/manifest.csv")) - 1

    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k != "load_avg_1m"}
    wall = {
        "decode": med["decode_s"],
        "decode_1proc": med["decode_1proc_s"],
        "pv": med["prepare_s"] + med["validate_s"],
        "pv_1proc": med["prepare_1proc_s"] + med["validate_s"],
    }
    cpu = {
        "decode": med["decode_cpu_s"],
        "decode_1proc": med["decode_1proc_cpu_s"],
        "pv": med["prepare_cpu_s"] + med["validate_cpu_s"],
        "pv_1proc": med["prepare_1proc_cpu_s"] + med["validate_cpu_s"],
    }
    out = {
        "images": n,
        "manifest_rows": manifest_rows,
        "workers": workers,
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "median": {k: round(v, 3) for k, v in med.items()},
        "load_avg_1m": [round(r["load_avg_1m"], 2) for r in rounds],
        "decode_only_img_per_s": round(n / wall["decode"], 1),
        "prepare_validate_img_per_s": round(n / wall["pv"], 1),
        "decode_only_1proc_img_per_s": round(n / wall["decode_1proc"], 1),
        "prepare_validate_1proc_img_per_s": round(n / wall["pv_1proc"], 1),
        "ratio": round(wall["decode"] / wall["pv"], 3),
        "ratio_1proc": round(wall["decode_1proc"] / wall["pv_1proc"], 3),
        # the comparison this bench used to make (1-process decode vs N-process prepare), for continuity
        "ratio_decode_1proc_vs_pv": round(wall["decode_1proc"] / wall["pv"], 3),
        "ratio_cpu": round(cpu["decode"] / cpu["pv"], 3),
        "ratio_cpu_1proc": round(cpu["decode_1proc"] / cpu["pv_1proc"], 3),
        "prepare_warm_cache_s": round(warm, 2),
    }
    loads = ", ".join(f"{r['load_avg_1m']:.1f}" for r in rounds)
    print(f"images: {n}; {os.cpu_count()} CPUs; load average at each round's start: {loads}; "
          f"median of {len(rounds)} round(s)")
    print(f"{'':30}{'wall s':>8}{'img/s':>9}{'CPU s':>8}{'img/CPU-s':>11}")

    def line(name: str, w: float, c: float) -> None:
        print(f"{name:30}{w:8.2f}{n / w:9.1f}{c:8.2f}{n / c:11.1f}")

    line(f"decode-only ({workers} proc)", wall["decode"], cpu["decode"])
    line(f"prepare --no-cache ({workers} proc)", med["prepare_s"], med["prepare_cpu_s"])
    line("validate (GX + Data Docs)", med["validate_s"], med["validate_cpu_s"])
    line(f"prepare+validate ({workers} proc)", wall["pv"], cpu["pv"])
    line("decode-only (1 proc)", wall["decode_1proc"], cpu["decode_1proc"])
    line("prepare --no-cache (1 proc)", med["prepare_1proc_s"], med["prepare_1proc_cpu_s"])
    line("prepare+validate (1 proc)", wall["pv_1proc"], cpu["pv_1proc"])

    def verdict(x: float) -> str:
        return "met" if x >= 0.5 else "NOT met"

    r0 = out["ratio_decode_1proc_vs_pv"]
    print(f"prepare+validate as the stages run ({workers} proc) vs a plain decode-only loop (1 proc), "
          f"target >= 0.5: {r0:.2f}x ({verdict(r0)})")
    print(f"stricter: vs decode-only with the same process count: {workers} proc {out['ratio']:.2f}x, "
          f"1 proc {out['ratio_1proc']:.2f}x; per CPU-second {out['ratio_cpu']:.2f}x / {out['ratio_cpu_1proc']:.2f}x")
    print(f"budget: the target allows prepare+validate <= 2x decode-only; validate alone (mostly the Great "
          f"Expectations import) is {med['validate_s'] / wall['decode_1proc']:.2f}x the 1-proc decode, leaving prepare "
          f"{2 - med['validate_s'] / wall['decode_1proc']:.2f}x (it takes {med['prepare_1proc_s'] / wall['decode_1proc']:.2f}x)")
    print(f"prepare with a warm stats cache: {warm:.2f} s")
    print(f"target: prepare+validate img/s >= 0.5x decode-only (1 proc)  measured: {r0:.2f}x  "
          f"{'MET' if r0 >= 0.5 else 'NOT MET'}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
