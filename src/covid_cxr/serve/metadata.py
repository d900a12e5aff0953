"""What GET /metadata says about the model: model.json, its evaluation and gate, the
intended use and limitations, and the service's limits and batching."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from covid_cxr.config import CLASSES
from covid_cxr.jsonio import read_json
from covid_cxr.serve.settings import ServeSettings

MODEL_NAME = "covid_cxr"
DISCLAIMER = (
    "Research prototype. Not a medical device and not for diagnostic use: "
    "a clinician must read every image."
)
INTENDED_USE = ("Research and teaching demo of chest X-ray triage into COVID / Normal / "
                "Viral Pneumonia. " + DISCLAIMER)
LIMITATIONS = [
    "Trained on the Kaggle COVID-19 Radiography Database only; other hospitals, scanners "
    "and populations are untested.",
    "Viral Pneumonia images (and part of Normal) come from a paediatric set: the model "
    "can partly tell that class by the patient's age.",
    "Films from hospitals outside the training sources are often misjudged: the model refers "
    "(verdict=refer) the ones it recognises as unlike its training films, not all of them.",
    "It knows only three classes: other diseases (e.g. tuberculosis) get one of the three labels "
    "or a refer verdict, never a diagnosis of their own.",
]


def in_production(bento: str | None) -> bool | None:
    """Is `bento` the one the project's production record names? None when no project is known:
    `covid-cxr serve` tells the server its project ($COVID_CXR_ROOT); a bare `bentoml serve` does not."""
    import os

    root = os.environ.get("COVID_CXR_ROOT")
    if not root:
        return None
    rec = read_json(Path(root) / "registry" / "production.json") or {}
    return bento is not None and rec.get("bento") == bento


def describe(model_dir: Path, model_tag: str, bento: str | None, store_info: Mapping[str, Any], ready: bool,
             settings: ServeSettings, batch_sizes: Mapping[int, int], precision: str | None = None) -> dict[str, Any]:
    """Model card fields for /metadata: model.json, the evaluation stored with the model, the Bento
    served and whether it is the production one."""
    from covid_cxr.model.modelmeta import migrate

    raw = read_json(model_dir / "model.json")
    meta = migrate(raw) if raw else {}
    md = store_info.get("metadata", {})
    labels = store_info.get("labels", {})
    # the store copy (packaged model) first; a dev directory's project files next
    metrics = read_json(model_dir / "metrics.json") or md.get("metrics") \
        or read_json(model_dir.parent / "eval" / "metrics.json")
    gate = read_json(model_dir / "gate.json") or md.get("gate") \
        or read_json(model_dir.parent / "gate.json")
    return {
        "name": MODEL_NAME,
        "model": model_tag,
        "bento": bento,
        "production": in_production(bento),
        "ready": ready,
        "classes": list(CLASSES),
        "arch": meta.get("arch"),
        "image_size": meta.get("image_size"),
        "temperature": meta.get("temperature"),
        "class_bias": meta.get("class_bias"),
        "clean_head": meta.get("clean_head"),
        "data_version": meta.get("data_md5"),
        "git_sha": labels.get("git_sha"),
        "params": meta.get("params"),
        "params_hash": meta.get("params_hash") or labels.get("params_hash"),
        "packaged_at": store_info.get("created"),
        "ood": meta.get("ood"),
        "verdict_policy": meta.get("verdict"),
        "metrics": metrics,
        "gate": {"passed": gate.get("passed"), "reasons": gate.get("reasons", [])} if gate else None,
        "intended_use": INTENDED_USE,
        "limitations": list(LIMITATIONS),
        "limits": {
            "max_upload_mb": settings.max_upload_bytes / 1024 / 1024,
            "max_pixels": settings.max_pixels,
            "min_side": (meta.get("input") or {}).get("min_side"),
            "max_batch_files": settings.max_files,
        },
        "precision": precision,
        "torch_threads": settings.torch_threads,
        "batching": {"max_batch_size": settings.batch_max_size,
                     "max_latency_ms": settings.batch_max_latency_ms,
                     "passes": settings.model_passes,
                     "batch_sizes_seen": dict(batch_sizes)},
        "auth": bool(settings.token),
    }
