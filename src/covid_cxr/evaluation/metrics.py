"""Classification and calibration metrics (pure numpy/sklearn, unit-tested against sklearn)."""
from __future__ import annotations

from typing import Any

import numpy as np

from covid_cxr.config import CLASSES

COVID = CLASSES.index("COVID")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reliability(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    """Equal-width confidence bins: mean confidence, accuracy and count per non-empty bin."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = idx == b
        if m.any():
            rows.append({"bin": b, "lo": float(edges[b]), "hi": float(edges[b + 1]),
                         "confidence": float(conf[m].mean()), "accuracy": float(correct[m].mean()),
                         "count": int(m.sum())})
    return rows


def ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: sum_b |acc_b - conf_b| * n_b / N (top-label)."""
    n = len(y)
    return float(sum(abs(r["accuracy"] - r["confidence"]) * r["count"] for r in reliability(probs, y, n_bins)) / n)


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y = np.asarray(y)
    pred = probs.argmax(axis=1)
    labels = list(range(len(CLASSES)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y, pred, labels=labels)
    covid_true = y == COVID
    covid_pred = pred == COVID
    neg = ~covid_true
    out: dict[str, Any] = {
        "n_test": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(f.mean()),
        "covid_recall": float((covid_pred & covid_true).sum() / max(covid_true.sum(), 1)),
        "covid_specificity": float((~covid_pred & neg).sum() / max(neg.sum(), 1)),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(CLASSES)
        },
        "confusion": cm.tolist(),
    }
    auc = {}
    for i, c in enumerate(CLASSES):
        yi = (y == i).astype(int)
        auc[c] = float(roc_auc_score(yi, probs[:, i])) if 0 < yi.sum() < len(yi) else float("nan")
    vals = [v for v in auc.values() if v == v]
    auc["macro"] = float(np.mean(vals)) if vals else float("nan")
    out["roc_auc"] = auc
    return out


def roc_points(y: np.ndarray, probs: np.ndarray) -> list[dict[str, Any]]:
    from sklearn.metrics import roc_curve

    rows = []
    for i, c in enumerate(CLASSES):
        yi = (np.asarray(y) == i).astype(int)
        if 0 < yi.sum() < len(yi):
            fpr, tpr, _ = roc_curve(yi, probs[:, i])
            rows += [{"class": c, "fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr)]
    return rows
