"""model.json: its schema version and the one migration from older files.

Every reader of model.json goes through `checkpoint.load_meta`, which applies `migrate`, so the
rest of the code reads one layout and never guesses a model's age from missing keys.

Schema 2 (written by `checkpoint.save_model` since 2026-12-06):
    schema             2
    arch, classes, image_size, normalize {mean, std}
    temperature, class_bias          calibration (model/calibration.py)
    verdict {min_confidence}         the low-confidence refer threshold
    ood {kind, combine, threshold, scales, centers, components}
                                     the novelty model (model/novelty.py); `threshold` is the one
                                     home of the novelty threshold
    clean_head {kind, inputs, temperature, l2}   the second head (model/cleanhead.py), if any
    data_md5, params, params_hash    what the model was built from
    valid_accuracy, clean_head_fit, n_train, n_valid, history   the fit, on train and valid
No per-run facts (times, durations, commits): a model.json is a pure function of data, code and params.

Schema 1 (files without `schema`) is every layout before that; `migrate` maps each variant.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

# The files a model directory may hold (checkpoint.py writes them; `package` copies them all).
WEIGHTS, META, OOD, CLEAN_HEAD = "model.safetensors", "model.json", "ood.safetensors", "clean_head.safetensors"
FILES = (WEIGHTS, META, OOD, CLEAN_HEAD)
SCHEMA = 2
REQUIRED = ("arch", "classes", "image_size", "normalize", "temperature", "class_bias", "verdict")


def check(meta: dict[str, Any]) -> None:
    """ValueError naming what a current-schema model.json lacks (checkpoint.save_model checks before writing)."""
    missing = [k for k in REQUIRED if k not in meta]
    missing += [] if "min_confidence" in (meta.get("verdict") or {}) else ["verdict.min_confidence"]
    if missing:
        raise ValueError(f"model.json (schema {SCHEMA}) lacks {', '.join(missing)}")


def model_id(model_dir: Path | str) -> str:
    """16 hex digits over the model directory's files (names and contents): the same files, the same id."""
    from covid_cxr.hashing import sha256_file

    h = hashlib.sha256()
    for name in FILES:
        f = Path(model_dir) / name
        if f.is_file():
            h.update(f"{name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()[:16]


def migrate(meta: dict[str, Any]) -> dict[str, Any]:
    """A model.json of any schema -> the current one (a new dict; the argument is not changed).
    ValueError for a schema newer than this code knows."""
    m = copy.deepcopy(meta)
    version = int(m.get("schema", 1))
    if version > SCHEMA:
        raise ValueError(f"model.json has schema {version}; this code reads up to {SCHEMA}: upgrade covid-cxr")
    if version == 1:
        m = _from_1(m)
    return m


def _from_1(m: dict[str, Any]) -> dict[str, Any]:
    m.setdefault("classes", ["COVID", "Normal", "Viral Pneumonia"])
    m.setdefault("temperature", 1.0)
    m.setdefault("class_bias", None)                    # before calibration offsets: temperature only
    verdict = dict(m.get("verdict") or {})
    threshold = verdict.pop("novelty_threshold", None)  # was written twice; `ood.threshold` is its home
    verdict.setdefault("min_confidence", 0.0)           # before the verdict: never low confidence
    m["verdict"] = verdict
    ood = m.get("ood")
    if ood is not None:
        ood = dict(ood)
        if "scales" not in ood:                         # before the style part: one unscaled content part,
            ood.update(scales={"content": 1.0}, flat_tensors=True)   # its tensors stored without a prefix
        ood.setdefault("centers", {k: 0.0 for k in ood["scales"]})
        ood.setdefault("combine", "max")                # before `verdict.combine`: the largest part
        if ood.get("threshold") is None:
            ood["threshold"] = threshold
        m["ood"] = ood
    if m.get("clean_head") is not None:
        m["clean_head"] = {"inputs": ["content"], **m["clean_head"]}   # before `inputs`: pooled features
    m["schema"] = SCHEMA
    return m
