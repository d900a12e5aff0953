"""Metrics against sklearn on crafted predictions."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, recall_score, roc_auc_score

from covid_cxr.config import CLASSES
from covid_cxr.evaluation.metrics import classification_metrics, ece, reliability, softmax


@pytest.fixture
def crafted():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3))
    logits[np.arange(300), y] += rng.uniform(-0.5, 3, 300)  # mostly right, some wrong
    return y, softmax(logits)


def test_matches_sklearn(crafted):
    y, p = crafted
    pred = p.argmax(1)
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    pr, rc, f1, _ = precision_recall_fscore_support(y, pred)
    for i, c in enumerate(CLASSES):
        assert m["per_class"][c]["precision"] == pytest.approx(pr[i])
        assert m["per_class"][c]["recall"] == pytest.approx(rc[i])
        assert m["per_class"][c]["f1"] == pytest.approx(f1[i])
        assert m["roc_auc"][c] == pytest.approx(roc_auc_score(y == i, p[:, i]))
    assert m["covid_recall"] == pytest.approx(recall_score(y == 0, pred == 0))
    assert m["covid_specificity"] == pytest.approx(recall_score(y != 0, pred != 0))
    assert m["roc_auc"]["macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_ece_hand_computed():
    # two bins used: conf 0.9 (2 right of 2) and conf 0.6 (1 right of 2)
    p = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    y = np.array([0, 0, 0, 1])
    # |1.0-0.9|*2/4 + |0.5-0.6|*2/4 = 0.1
    assert ece(p, y, 15) == pytest.approx(0.1)
    rows = reliability(p, y, 15)
    assert [r["count"] for r in rows] == [2, 2]


def test_ece_zero_when_perfectly_calibrated():
    p = np.tile([1.0, 0.0, 0.0], (10, 1))
    assert ece(p, np.zeros(10, int)) == pytest.approx(0.0)


def test_temperature_scaling_reduces_ece_on_overconfident_logits():
    from covid_cxr.model.train import fit_temperature

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 2000)
    logits = rng.normal(size=(2000, 3))
    logits[np.arange(2000), y] += 1.0
    logits *= 4  # overconfident
    t = fit_temperature(logits, y)
    assert t > 2
    assert ece(softmax(logits, t), y) < ece(softmax(logits), y) / 2
