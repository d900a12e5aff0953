"""Which model the service serves, given as BentoML service arguments (`bentoml.use_arguments`):

    --arg model_dir=DIR   a model directory (model.json + model.safetensors): development,
                          `covid-cxr serve --model-dir DIR`;
    --arg model=TAG       a model in the BentoML store. `covid-cxr package` builds the Bento with it,
                          so a built Bento records its one model version in its own arguments;
    neither               `covid_cxr:latest` from the store.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml

from covid_cxr.serve.metadata import MODEL_NAME
from covid_cxr.serve.settings import ServeArgs


def serve_args() -> ServeArgs:
    """The service's arguments (settings.py): a built Bento's own, or `bentoml serve --arg`'s."""
    return bentoml.use_arguments(ServeArgs)


def store_model_ref(args: ServeArgs) -> bentoml.models.BentoModel:
    """The model the service declares (and `bentoml build` packs)."""
    return bentoml.models.BentoModel(args.model or f"{MODEL_NAME}:latest")


def locate_model(svc: Any, args: ServeArgs, ref: bentoml.models.BentoModel | None
                 ) -> tuple[Path, str, dict[str, Any]]:
    """-> (model directory, model id, store info: labels, metadata, created).

    `svc` is the bentoml.Service being served, `ref` the model it declares (None in dev mode).
    A directory's id is `dir:<sha of its files>` (modelmeta.model_id); a store model's its tag."""
    from covid_cxr.model.modelmeta import model_id

    if args.model_dir:
        p = Path(args.model_dir).resolve()
        if not (p / "model.json").is_file():
            raise RuntimeError(f"model_dir={args.model_dir}: no model.json there")
        return p, f"dir:{model_id(p)}", {}
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
            "or serve a model directory: `covid-cxr serve --model-dir artifacts/model`"
        )
    info = {"labels": dict(stored.info.labels), "metadata": dict(stored.info.metadata),
            "created": stored.info.creation_time.isoformat()}
    return Path(stored.path), str(stored.tag), info


def bento_tag(svc: Any) -> str | None:
    """The tag of the Bento `svc` was loaded from; None when served from source."""
    bento = getattr(svc, "bento", None)
    return None if bento is None else str(bento.tag)


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
