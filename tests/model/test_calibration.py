"""Calibration fitted on valid: temperature, or temperature plus one logit offset per class."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from covid_cxr.model.calibration import Calibration, fit_calibration
from covid_cxr.model.modelmeta import migrate


def _nll(cal: Calibration, z, y) -> float:
    return float(torch.nn.functional.cross_entropy(torch.log(torch.as_tensor(cal.probs(z), dtype=torch.float64)),
                                                   torch.as_tensor(y)))


def _shifted(n: int = 3000, seed: int = 0):
    """Separable-ish logits whose class 0 is pushed down by 1.5: a prior the model under-predicts."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(size=(n, 3))
    z[np.arange(n), y] += 2.0
    z[:, 0] -= 1.5
    return (3 * z).astype(np.float32), y      # x3: over-confident as well


def test_class_offset_recovers_an_under_predicted_class_and_beats_temperature_alone():
    z, y = _shifted()
    t_only = fit_calibration(z, y, "temperature")
    both = fit_calibration(z, y, "temperature_bias")
    assert t_only.bias is None and t_only.temperature > 1.5
    b = np.array(both.bias)
    assert b.sum() == pytest.approx(0.0, abs=1e-9)
    assert b[0] > 0.5 > max(b[1], b[2])     # class 0 gets back what the shift took
    assert _nll(both, z, y) < _nll(t_only, z, y) - 0.01
    # held-out films of the same kind: more class-0 films right, better accuracy
    z2, y2 = _shifted(seed=1)
    acc = lambda c: float((c.probs(z2).argmax(1) == y2).mean())  # noqa: E731
    rec0 = lambda c: float((c.probs(z2).argmax(1)[y2 == 0] == 0).mean())  # noqa: E731
    assert acc(both) > acc(t_only) and rec0(both) > rec0(t_only) + 0.1


def test_temperature_only_never_changes_the_label():
    z, y = _shifted()
    cal = fit_calibration(z, y, "temperature")
    np.testing.assert_array_equal(cal.probs(z).argmax(1), z.argmax(1))


def test_offsets_stay_finite_and_no_worse_on_near_flat_logits():
    from test_metrics import FLAT_LOGITS

    z = np.array(FLAT_LOGITS, dtype=np.float32)
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    both, t_only = fit_calibration(z, y, "temperature_bias"), fit_calibration(z, y, "temperature")
    assert np.isfinite(both.temperature) and np.all(np.isfinite(both.bias))
    assert _nll(both, z, y) <= _nll(t_only, z, y) + 1e-6


def test_meta_round_trip_and_models_saved_before_offsets():
    cal = Calibration(0.41, (1.1, -0.2, -0.9))
    assert Calibration.from_meta(cal.to_meta()) == cal
    old = Calibration.from_meta(migrate({"temperature": 0.5}))   # a model.json from before class_bias
    assert old.bias is None
    z = np.array([[1.0, 2.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(old.probs(z), torch.softmax(torch.tensor(z) / 0.5, 1).numpy(), rtol=1e-6)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="train.calibration"):
        fit_calibration(np.zeros((3, 3)), np.arange(3), "platt")


def test_loaded_model_applies_the_offsets_to_probabilities_but_not_to_novelty(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
    import svcmodel

    from covid_cxr.model.checkpoint import load_model

    try:
        # one head: the offsets act on the trained head; a clean head's own vote would blur the label check
        d = svcmodel.build_test_model(tmp_path / "m", image_size=64, n_per_class=4, clean_head=False)
    except FileNotFoundError as e:  # the real films are in ../shared
        pytest.skip(f"no test model: {e}")
    m = load_model(d)
    x = np.stack([np.full((64, 64), v, np.uint8) for v in (40, 90, 140, 200)])
    base = m.predict(x)
    from covid_cxr.config import CLASSES

    c = next(i for i in range(len(CLASSES)) if CLASSES[i] != base.labels[0])   # a class film 0 is not
    m.meta["class_bias"] = [80.0 if i == c else -40.0 for i in range(len(CLASSES))]
    pushed = m.predict(x)
    assert pushed.labels == [CLASSES[c]] * 4
    np.testing.assert_allclose(pushed.logits, base.logits, rtol=1e-6)
    if base.novelty is not None:
        np.testing.assert_allclose(pushed.novelty, base.novelty, rtol=1e-6)
