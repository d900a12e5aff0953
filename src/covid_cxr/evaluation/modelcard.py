"""Model card (Markdown), one per model, written by the evaluate stage."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from covid_cxr.config import CLASSES


PART_WORDS = {  # checkpoint.Novelty parts, in words
    "content": "the Mahalanobis distance of the pooled features from the class means (what the film shows)",
    "knn": "the distance to the nearest training films in feature space (what the film shows)",
    "style": "the distance of early-layer activation statistics (how it was acquired and processed)",
    "energy": "the energy of the calibrated logits (no class claims the film)",
}


def _calibration(meta: dict[str, Any]) -> str:
    s = f"temperature {float(meta.get('temperature', 1.0)):.3f}"
    if meta.get("class_bias"):
        s += " and one logit offset per class (" + ", ".join(
            f"{c} {float(b):+.2f}" for c, b in zip(meta.get("classes") or CLASSES, meta["class_bias"])) + ")"
    return s


def _heads(meta: dict[str, Any]) -> str:
    from covid_cxr.model.cleanhead import in_words

    c = meta.get("clean_head")
    if not c:
        return "- Heads: one; its calibrated probabilities are the answer."
    reads = in_words(c.get("inputs", ["content"]))   # model files from before `inputs`: pooled features
    return (f"- Heads: two on the same body, one forward pass. The answer is the mean of their calibrated\n"
            f"  probabilities: the trained head, and a logistic regression fitted on the {reads} of the\n"
            f"  *unaugmented* training films (L2 {float(c['l2']):g}, temperature {float(c['temperature']):.3f}, both by\n"
            f"  valid NLL; model/cleanhead.py). The second head reads the training sources as they are, shortcuts\n"
            f"  included; where the two heads disagree the mean loses confidence and the film is referred.")


def _parts(meta: dict[str, Any]) -> str:
    parts = list(((meta.get("ood") or {}).get("scales") or {}))
    return "; ".join(PART_WORDS.get(k, k) for k in parts) or "no parts"


def _combine(meta: dict[str, Any]) -> str:
    return "sum" if (meta.get("ood") or {}).get("combine") == "sum" else "largest"


def _verdict(meta: dict[str, Any]) -> str:
    nov = (meta.get("ood") or {}).get("threshold")
    return (f"Novelty threshold {nov:.2f}" if nov is not None else "No novelty model") + \
        f", minimum confidence {meta['verdict']['min_confidence']:.3f}"


def _resolution(meta: dict[str, Any]) -> str:
    p = meta.get("params", {})
    if p.get("final_size") and p.get("final_size") != p.get("size"):
        return f"{p.get('size')} px, then {p.get('final_size')} px (progressive resizing)"
    return f"{meta.get('image_size')} px"


def render_model_card(meta: dict[str, Any], m: dict[str, Any], external: list[str] | None = None) -> str:
    p = meta.get("params", {})
    rows = "\n".join(
        f"| {c} | {m['per_class'][c]['precision']:.4f} | {m['per_class'][c]['recall']:.4f} | "
        f"{m['per_class'][c]['f1']:.4f} | {m['per_class'][c]['support']} |" for c in CLASSES)
    flagged = f"{m['flagged']:.4f}" if "flagged" in m else "n/a"
    ext = "\n".join(external or [])
    return f"""# Model card: covid-cxr `{meta.get('arch')}`

## Intended use
A **research triage aid** that sorts chest X-rays into {", ".join(CLASSES)}, to help researchers
and data teams prioritise review. **It is not a diagnostic device and must not be used for
diagnosis or treatment decisions.** Every output needs review by a qualified clinician.

## Model
- Architecture: `{meta.get('arch')}` (ImageNet-pretrained, from an offline PyPI wheel), fine-tuned with fastai:
  a frozen phase on cached features, then the top {p.get('unfreeze_groups')} of 4 backbone groups unfrozen
  at {_resolution(meta)}, one-cycle schedules with discriminative learning rates.
- Input: greyscale, resized to {meta.get('image_size')} x {meta.get('image_size')} px, replicated to 3 channels,
  normalised with mean {meta.get('normalize', {}).get('mean')} / std {meta.get('normalize', {}).get('std')}.
- Profile `{p.get('profile')}`, params hash `{meta.get('params_hash')}`.
- Calibration: {_calibration(meta)}, fitted on the validation split (model/calibration.py).
{_heads(meta)}
- Training against acquisition shortcuts: each training film is re-processed at random as another site
  might (unsharp masking, blur, gamma, contrast, partial histogram equalisation, noise, JPEG re-compression),
  with label smoothing {p.get('label_smoothing', 0)}.
- **Verdict**: every answer is `ok` or `refer` (`not_an_xray`, `outside_training_data`, `low_confidence`).
  The novelty score is the {_combine(meta)} of its standardised parts: {_parts(meta)}.
  {_verdict(meta)}; both fitted on the validation split (`verdict` in params.yaml).

## Data
- Dataset version (DVC `data.dvc` md5): `{meta.get('data_md5')}`.
- COVID-19 Radiography Database (Chowdhury et al. 2020; Rahman et al. 2021), 256 px greyscale PNGs.
  Split by near-duplicate group so that no near-identical scans straddle train/valid/test:
  {meta.get('n_train')} train / {meta.get('n_valid')} valid / {m['n_test']} test images.
- **Caveat:** the Viral Pneumonia images (and part of Normal) come from the Kermany et al. paediatric
  set. The model can partly tell that class by the patient's age rather than by pathology; expect
  worse performance on adult viral pneumonia.

## Performance (held-out test split)
| metric | value |
|---|---|
| accuracy | {m['accuracy']:.4f} |
| macro-F1 | {m['macro_f1']:.4f} |
| COVID sensitivity | {m['covid_recall']:.4f} |
| COVID specificity | {m['covid_specificity']:.4f} |
| ROC-AUC (macro) | {m['roc_auc']['macro']:.4f} |
| ECE (15 bins) before / after temperature scaling | {m['ece_before']:.4f} / {m['ece_after']:.4f} |
| referred (verdict refer), test | {flagged} |

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

{ext}
## Limitations
- Trained on one public, curated dataset; images from other hospitals, scanners, projections (lateral, AP
  portable), or paediatric/adult mixes unlike this one may degrade accuracy without warning.
- The three classes are not exhaustive: bacterial pneumonia, tuberculosis, lung opacity, effusion, etc.
  will get one of them or a refer verdict. The refer verdict catches many films unlike the training
  films, not all: see "Outside the training sources".
- Labels are dataset-level, not clinically adjudicated per image; source-specific artefacts
  (text markers, borders, age) can act as shortcuts.
- Calibrated probabilities are calibrated on this data distribution only.
"""


def write_model_card(path: Path, meta: dict[str, Any], metrics: dict[str, Any],
                     external: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(meta, metrics, external))
