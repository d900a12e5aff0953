"""Which model the service serves.

    COVID_CXR_MODEL_DIR  a model directory (model.json + model.safetensors), for local dev;
    otherwise the BentoML model COVID_CXR_MODEL (default `covid_cxr:latest`). A built
    Bento carries exactly the model version it was built with.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml

from covid_cxr.serve.metadata import MODEL_NAME


def dev_model_dir() -> str | None:
    """COVID_CXR_MODEL_DIR, if set: serve that directory, not a model from the store."""
    return os.environ.get("COVID_CXR_MODEL_DIR") or None


def store_model_ref() -> bentoml.models.BentoModel:
    """The model the service declares (and `bentoml build` packs): COVID_CXR_MODEL or covid_cxr:latest."""
    return bentoml.models.BentoModel(os.environ.get("COVID_CXR_MODEL") or f"{MODEL_NAME}:latest")


def locate_model(svc: Any, ref: bentoml.models.BentoModel | None) -> tuple[Path, str, dict[str, Any]]:
    """-> (model directory, model tag, store info: labels, metadata, created).

    `svc` is the bentoml.Service being served, `ref` the model it declares (None in dev mode)."""
    d = dev_model_dir()
    if d:
        p = Path(d).resolve()
        if not (p / "model.json").is_file():
            raise RuntimeError(f"COVID_CXR_MODEL_DIR={d}: no model.json there")
        return p, f"dir:{p}", {}
    pinned = bento_pinned_model(svc)
    if pinned is not None:
        # Serving a built Bento: its model version, not whatever `latest` is in the store
        # now (BentoML re-pins only Hugging Face models when it loads a Bento).
        ref = bentoml.models.BentoModel(pinned)
    assert ref is not None
    stored = ref.stored  # local store only: never reaches for a remote registry
    if stored is None:
        raise RuntimeError(
            f"BentoML model {ref.tag} is not in the model store "
            f"({os.environ.get('BENTOML_HOME', '~/bentoml')}): run `covid-cxr package`, "
            "or set COVID_CXR_MODEL_DIR=artifacts/model for local development"
        )
    info = {"labels": dict(stored.info.labels), "metadata": dict(stored.info.metadata),
            "created": stored.info.creation_time.isoformat()}
    return Path(stored.path), str(stored.tag), info


def bento_pinned_model(svc: Any) -> str | None:
    """The model version recorded in the Bento `svc` was loaded from, if any."""
    bento = getattr(svc, "bento", None)
    if bento is None:
        return None
    for info in bento.info.services:
        if info.name == svc.name:
            for m in info.models:
                if m.tag.name == MODEL_NAME:
                    return str(m.tag)
    return None
