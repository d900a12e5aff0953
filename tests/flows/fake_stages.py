"""Cheap stand-ins for the pipeline stages, for the flow's fault tests.

The tests run REAL dvc and a REAL Prefect server over a temp project whose dvc.yaml calls
this script instead of `covid-cxr <stage>`, so that a "training" takes milliseconds (or waits
to be killed) and the metrics the gate sees are set in params.yaml (`fake.metrics`).
Also acts as `covid-cxr package`, and `release_fakes` stand in for the two release/registry.py
functions that need a BentoML store (`describe`, `export_bento`): the promotion rule, the
production record, `dvc add` / `dvc push` of the "export" and the git commit stay real.

    python fake_stages.py prepare|validate|train|evaluate|gate
    python fake_stages.py --cli package               (as `covid-cxr`, via a wrapper on PATH)
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path.cwd()
ART = ROOT / "artifacts"
CLASSES = ("COVID", "Normal", "Viral Pneumonia")


def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def prepare() -> None:
    rows = []
    for cls in CLASSES:
        for p in sorted((ROOT / "data" / "COVID-19_Radiography_Dataset" / cls / "images").glob("*.png")):
            sha = hashlib.sha256(p.read_bytes()).hexdigest()
            split = ("train", "train", "valid", "test")[int(sha[:2], 16) % 4]
            rows.append(f"{p.relative_to(ROOT).as_posix()},{cls},{sha},{split}")
    out = ART / "data" / "manifest.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("path,label,sha256,split\n" + "\n".join(rows) + "\n")


def validate() -> None:
    n = len((ART / "data" / "manifest.csv").read_text().splitlines()) - 1
    (ART / "validation" / "docs").mkdir(parents=True, exist_ok=True)
    (ART / "validation" / "docs" / "index.html").write_text(f"<p>{n} rows</p>")
    write(ART / "validation" / "summary.json", {"success": True, "n": n})


def train() -> None:
    model = ART / "model"
    model.mkdir(parents=True, exist_ok=True)
    (ROOT / ".train_started").write_text(str(os.getpid()))
    # half-written weights: what a kill mid-training leaves behind
    (model / "model.safetensors").write_bytes(b"partial")
    hold = ROOT / "HOLD_TRAIN"
    deadline = time.monotonic() + 120
    while hold.exists() and time.monotonic() < deadline:  # the kill test kills us here
        time.sleep(0.2)
    manifest = (ART / "data" / "manifest.csv").read_bytes()
    (model / "model.safetensors").write_bytes(hashlib.sha256(manifest).digest() * 4)
    write(model / "model.json", {"arch": "fake", "classes": list(CLASSES),
                                 "data_md5": hashlib.md5(manifest).hexdigest(),
                                 "n_rows": manifest.count(b"\n") - 1})


def evaluate() -> None:
    json.loads((ART / "model" / "model.json").read_text())  # needs a finished model
    write(ART / "eval" / "metrics.json", dict(params()["fake"]["metrics"]))


def _champion():
    p = ROOT / "registry" / "production.json"
    rec = json.loads(p.read_text()) if p.exists() else None
    return rec if rec and rec.get("bento") else None


def gate() -> int:
    """Like `covid-cxr gate`: gate.json holds the verdict, the exit status is 0 either way."""
    g = params()["gate"]
    m = json.loads((ART / "eval" / "metrics.json").read_text())
    reasons, ok = [], True
    for key, limit, lower_ok in (("accuracy", g["min_accuracy"], False), ("macro_f1", g["min_macro_f1"], False),
                                 ("covid_recall", g["min_covid_recall"], False), ("ece_after", g["max_ece"], True)):
        good = m[key] <= limit if lower_ok else m[key] >= limit
        ok &= good
        reasons.append(f"{key} {m[key]:.4f} {'<=' if lower_ok else '>='} {limit}: {'ok' if good else 'FAIL'}")
    champ = _champion()
    if champ:
        for key in ("accuracy", "macro_f1", "covid_recall"):
            good = m[key] >= champ["metrics"][key] - g["champion_tolerance"]
            ok &= good
            reasons.append(f"{key} vs champion {champ['metrics'][key]:.4f}: {'ok' if good else 'FAIL'}")
    write(ART / "gate.json", {"passed": ok, "reasons": reasons, "metrics": m,
                              "champion": {"bento": champ["bento"], "metrics": champ["metrics"]} if champ else None})
    return 0


def cli(argv: list[str]) -> int:
    """The fake `covid-cxr package`: a "Bento" record, no BentoML build."""
    if argv[:1] == ["package"]:
        g = json.loads((ART / "gate.json").read_text())
        if not g["passed"]:
            print("gate did not pass", file=sys.stderr)
            return 1
        digest = hashlib.sha256((ART / "model" / "model.safetensors").read_bytes()).hexdigest()[:12]
        rec = {"bento": f"covid_cxr:{digest}", "model": f"covid_cxr_model:{digest}",
               "metrics": json.loads((ART / "eval" / "metrics.json").read_text())}
        write(ART / "bento.json", rec)
        print(json.dumps(rec))
        return 0
    print(f"fake covid-cxr: unsupported {argv}", file=sys.stderr)
    return 2


def release_fakes(root: Path):
    """(describe, export_bento) for covid_cxr.release.registry, answering from the project's fake Bento
    record (artifacts/bento.json) instead of a BentoML store."""
    root = Path(root)

    def describe(bento_tag: str) -> dict:
        from covid_cxr.release.registry import PromotionError

        rec = json.loads((root / "artifacts" / "bento.json").read_text())
        if rec.get("bento") != bento_tag:
            raise PromotionError(f"Bento {bento_tag} is not in the store (fake)")
        return {"bento": bento_tag, "model": rec["model"], "gate": "passed", "metrics": rec["metrics"],
                "data_md5": None, "git_sha": None, "params_hash": None}

    def export_bento(bento_tag: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(f"fake export of {bento_tag}\n")
        return dest

    return describe, export_bento


def install_release_fakes(root: Path) -> None:
    """For a flow run in a subprocess: patch covid_cxr.release.registry in this interpreter."""
    from covid_cxr.release import registry as release

    release.describe, release.export_bento = release_fakes(root)


if __name__ == "__main__":
    if sys.argv[1] == "--cli":
        sys.exit(cli(sys.argv[2:]))
    stage = sys.argv[1]
    sys.exit({"prepare": prepare, "validate": validate, "train": train,
              "evaluate": evaluate, "gate": gate}[stage]() or 0)
