"""model.json: its schema version and the one migration from older files.

Every reader of model.json goes through `checkpoint.load_meta`, which applies `migrate`, so the
rest of the code reads one layout and never guesses a model's age from missing keys.

Schema 4 (written by `checkpoint.save_model` since 2026-12-06):
    schema             4
    arch, classes, image_size, normalize {mean, std}
    inference {precision, bf16_from}   what the body answers in, and every threshold was fitted on
                                     (model/precision.py: float32, or bfloat16 from body module bf16_from)
    input {min_side}                 the smallest image side accepted (params.yaml validate.min_side: the same
                                     for `data check`, the service and `predict`, which read it here)
    temperature, class_bias          calibration (model/calibration.py)
    verdict {min_confidence, covid_triage}   the low-confidence and triage levels (model/verdict.py)
    input_gate {kind, threshold, settings, scales}   is it a chest film at all (model/inputgate.py), if any
    ood {kind, combine, threshold, scales, centers, components}
                                     the novelty model (model/novelty.py); `threshold` is the one
                                     home of the novelty threshold
    clean_head {kind, inputs, temperature, l2}   the second head (model/cleanhead.py), if any
    data_md5, params, params_hash    what the model was built from
    valid_accuracy, clean_head_fit, n_train, n_valid, history   the fit, on train and valid
No per-run facts (times, durations, commits): a model.json is a pure function of data, code and params.

Schema 3 had no `inference` (its models answer in float32). Schema 2 had no `input`, `verdict.covid_triage` or input gate. Schema 1 (files without `schema`) is
every layout before that; `migrate` maps each variant, one schema at a time.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

# The files a model directory may hold (checkpoint.py writes them; `package` copies them all).
WEIGHTS, META, OOD, CLEAN_HEAD = "model.safetensors", "model.json", "ood.safetensors", "clean_head.safetensors"
INPUT_GATE = "input_gate.safetensors"
FILES = (WEIGHTS, META, OOD, CLEAN_HEAD, INPUT_GATE)
SCHEMA = 4
REQUIRED = ("arch", "classes", "image_size", "normalize", "temperature", "class_bias", "verdict", "input",
            "inference")


def check(meta: dict[str, Any]) -> None:
    """ValueError naming what a current-schema model.json lacks (checkpoint.save_model checks before writing)."""
    missing = [k for k in REQUIRED if k not in meta]
    missing += [f"verdict.{k}" for k in ("min_confidence", "covid_triage") if k not in (meta.get("verdict") or {})]
    missing += [] if "min_side" in (meta.get("input") or {}) else ["input.min_side"]
    missing += [f"inference.{k}" for k in ("precision", "bf16_from") if k not in (meta.get("inference") or {})]
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
    if m["schema"] == 2:
        m = _from_2(m)
    if m["schema"] == 3:
        m = _from_3(m)
    return m


def _from_3(m: dict[str, Any]) -> dict[str, Any]:
    m["inference"] = {"precision": "float32", "bf16_from": None}   # fitted and evaluated in float32
    m["schema"] = 4
    return m


def _from_2(m: dict[str, Any]) -> dict[str, Any]:
    m["verdict"] = {"covid_triage": None, **m["verdict"]}   # no triage level: nothing referred for it
    m.setdefault("input", {"min_side": 16})                  # what the service accepted before it was the model's
    m["schema"] = 3
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
    m["schema"] = 2
    return m
