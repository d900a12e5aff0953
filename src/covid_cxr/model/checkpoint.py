"""Weights-only model files: `model.safetensors` + `model.json` (+ `ood.safetensors`, the novelty
model; + `clean_head.safetensors`, the second head of model/cleanhead.py).

Serving, evaluation and the champion check load models only through here.
Nothing is ever unpickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from covid_cxr.config import CLASSES
from covid_cxr.model.calibration import Calibration
from covid_cxr.model.cleanhead import CleanHead, mix
from covid_cxr.data.preprocess import Norm, normalize_batch
from covid_cxr.model.inputgate import InputGate
from covid_cxr.model.modelmeta import CLEAN_HEAD, FILES, INPUT_GATE, META, OOD, SCHEMA, WEIGHTS, check, migrate  # noqa: F401
from covid_cxr.model.nets import CxrNet, build, inference_body as _frozen_body
from covid_cxr.model.novelty import Novelty, OodModel
from covid_cxr.model.verdict import Policy, decide



@dataclass
class Predictions:
    """One batch through the model: calibrated probabilities, novelty and the verdict."""

    logits: np.ndarray            # (N, C) raw, of the trained head
    probs: np.ndarray             # (N, C) calibrated (model/calibration.py); with a clean head, the mean of both
    novelty: np.ndarray | None    # (N,) novelty score, None without a novelty model
    novel: np.ndarray             # (N,) bool: novelty over threshold
    verdict: list[str]            # "ok" | "refer"
    reason: list[str | None]      # verdict.REASONS key, None when ok
    gate: np.ndarray | None = None   # (N,) the input gate's score, None without a gate

    @property
    def labels(self) -> list[str]:
        return [CLASSES[i] for i in self.probs.argmax(1)]


@dataclass
class LoadedModel:
    net: CxrNet
    meta: dict[str, Any]
    ood: Novelty | None = None
    channels_last: bool = True
    clean: CleanHead | None = None   # the second head (model/cleanhead.py), None for one-head models
    gate: InputGate | None = None    # is it a chest film at all (model/inputgate.py), None for older models
    precision: str = "float32"       # what it answers in: float32 | bfloat16 (model/precision.py)
    body: Any = None                 # the body answers go through (nets.inference_body; load_model builds it)

    @property
    def min_side(self) -> int:
        """The smallest image side this model accepts (model.json `input.min_side`)."""
        return int(self.meta["input"]["min_side"])

    @property
    def size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def norm(self) -> Norm:
        n = self.meta["normalize"]
        return Norm(tuple(n["mean"]), tuple(n["std"]))

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_meta(self.meta)

    @property
    def policy(self) -> Policy:
        return Policy.from_meta(self.meta)

    def to_input(self, grays) -> torch.Tensor:
        """uint8 (B,H,W) at `size` -> normalised float batch."""
        return normalize_batch(grays, self.norm, self.channels_last)

    @torch.inference_mode()
    def forward(self, grays) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (raw logits, pooled features, style vector), float32 whatever the body ran in."""
        if self.body is None:
            self.body = inference_body(self.net, self.precision, self.meta, self.channels_last)
        feats, style = self.body(self.to_input(grays))
        return self.net.head(feats), feats, style

    @torch.inference_mode()
    def predict(self, grays, not_xray: Sequence[str | None] | None = None) -> Predictions:
        """Calibrated probabilities, novelty and verdict for a batch of (B,S,S) uint8 films.

        `not_xray[i]`: the data-check rule (`not_xray_colour`, `not_xray_blank`) that image i
        failed before it was made grey, or None.
        """
        logits, feats, style = self.forward(grays)
        probs = self.calibration.probs(logits)
        if self.clean is not None:
            probs = mix(probs, self.clean.probs(feats, style))
        novelty, novel = None, np.zeros(len(probs), bool)
        if self.ood is not None:
            novelty = self.ood.score(feats, style, logits).numpy()
            novel = novelty > self.ood.threshold
        gate_score, not_chest = (None, None) if self.gate is None else self.gate.flags(grays)
        verdicts, reasons = decide(probs, novel, self.policy, not_xray, not_chest)
        return Predictions(logits.numpy(), probs, novelty, novel, verdicts, reasons, gate_score)

    def cam_head(self, x: torch.Tensor | None = None):
        """What Grad-CAM differentiates: pooled features -> per-class scores of the answer given.

        One head: its raw logits. Two heads: the log of their mean calibrated probability. A clean
        head that reads the style statistics needs `x`, the normalised batch: its style term is a
        constant of the last feature map (the style taps lie upstream of it)."""
        if self.clean is None:
            return self.net.head
        cal, clean, head = self.calibration, self.clean, self.net.head
        style = None
        if "style" in clean.inputs:
            if x is None:
                raise ValueError("this model's clean head reads style statistics: cam_head needs the input batch")
            with torch.no_grad():
                style = self.net.embed(x)[1].float()

        def score(pooled: torch.Tensor) -> torch.Tensor:
            p = (torch.softmax(cal.logits(head(pooled)), dim=1) + clean.probs_t(pooled, style)) / 2
            return p.clamp_min(1e-12).log()
        return score


def save_model(net: CxrNet, meta: dict[str, Any], out_dir: Path, ood: Novelty | OodModel | None = None,
               clean: CleanHead | None = None, gate: InputGate | None = None) -> None:
    """Write a model directory: the weights-only files and model.json (schema modelmeta.SCHEMA,
    checked before anything is written)."""
    meta = {**meta, "schema": SCHEMA, "arch": net.arch}
    meta.setdefault("classes", list(CLASSES))
    if isinstance(ood, OodModel):   # one unscaled content part (tests build such small models)
        ood = Novelty({"content": ood}, {"content": 1.0}, ood.threshold, {"content": 0.0}, "max")
    if ood is not None:
        meta["ood"] = ood.describe()
    if clean is not None:
        meta["clean_head"] = clean.describe()
    if gate is not None:
        meta["input_gate"] = gate.describe()
    check(meta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(out_dir / WEIGHTS))
    if ood is not None:
        save_file({k: v.contiguous() for k, v in ood.tensors().items()}, str(out_dir / OOD))
    if clean is not None:
        save_file(clean.tensors(), str(out_dir / CLEAN_HEAD))
    if gate is not None:
        save_file(gate.tensors(), str(out_dir / INPUT_GATE))
    (out_dir / META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_meta(model_dir: Path) -> dict[str, Any]:
    """model.json in the current schema (older files through modelmeta.migrate)."""
    return migrate(json.loads((Path(model_dir) / META).read_text()))


def inference_body(net: CxrNet, precision: str, meta: dict[str, Any], channels_last: bool = True):
    """The body a model answers through in `precision` (its model.json `inference` says from which
    module bfloat16 starts): nets.inference_body, as training fitted the model on."""
    start = meta["inference"]["bf16_from"] if precision == "bfloat16" else None
    return _frozen_body(net, start, int(meta["image_size"]), channels_last)


def load_model(model_dir: Path, channels_last: bool = True, precision: str | None = None) -> LoadedModel:
    """A model directory, ready to predict. `precision`: None answers in the precision the model was
    fitted in (model.json `inference`: evaluation, `predict`); the service passes
    precision.serve_precision's choice."""
    if precision not in (None, "float32", "bfloat16"):
        raise ValueError(f"precision must be float32 or bfloat16, not {precision!r}")
    model_dir = Path(model_dir)
    meta = load_meta(model_dir)
    if tuple(meta.get("classes", CLASSES)) != CLASSES:
        raise ValueError(f"model classes {meta.get('classes')} differ from {CLASSES}")
    net = build(meta["arch"], n_classes=len(CLASSES), pretrained=False)
    net.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    net.eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    ood = None
    if (model_dir / OOD).exists() and "ood" in meta:
        ood = Novelty.from_tensors(load_file(str(model_dir / OOD)), meta["ood"])
    clean = None
    if "clean_head" in meta:
        if not (model_dir / CLEAN_HEAD).exists():
            raise FileNotFoundError(f"model.json names a clean head but {model_dir / CLEAN_HEAD} is missing")
        clean = CleanHead.from_tensors(load_file(str(model_dir / CLEAN_HEAD)), meta["clean_head"])
    gate = None
    if "input_gate" in meta:
        if not (model_dir / INPUT_GATE).exists():
            raise FileNotFoundError(f"model.json names an input gate but {model_dir / INPUT_GATE} is missing")
        gate = InputGate.from_tensors(load_file(str(model_dir / INPUT_GATE)), meta["input_gate"])
    precision = precision or meta["inference"]["precision"]
    return LoadedModel(net=net, meta=meta, ood=ood, channels_last=channels_last, clean=clean, gate=gate,
                       precision=precision, body=inference_body(net, precision, meta, channels_last))
