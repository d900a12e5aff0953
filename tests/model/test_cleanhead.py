"""The clean second head (model/cleanhead.py): its fit, its file, and how a loaded model uses it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_cxr.config import CLASSES
from covid_cxr.model.cleanhead import CleanHead, fit_clean_head, mix
from covid_cxr.model.modelmeta import CLEAN_HEAD as FILE, migrate


def _blobs(n_train: int, n_valid: int, d: int = 20, seed: int = 0, noise: int = 0):
    """Three Gaussian classes in d dimensions on very different column scales, split train/valid.

    `noise` training labels are shifted by one class."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (3, d))
    n = n_train + n_valid
    y = rng.integers(0, 3, n)
    x = (centers[y] + rng.normal(0, 1, (n, d))) * np.geomspace(1e-3, 1e3, d)
    x = x.astype(np.float32)
    yt = y[:n_train].copy()
    yt[:noise] = (yt[:noise] + 1) % 3
    return x[:n_train], yt, x[n_train:], y[n_train:]


def test_fit_recovers_the_classes_on_raw_features_whatever_their_scale():
    xt, yt, xv, yv = _blobs(600, 300, seed=1)
    head, rows = fit_clean_head({"content": xt}, yt, {"content": xv}, yv, [1e-3, 1e-1], len(CLASSES),
                                inputs=["content"])
    pred = head.probs(torch.as_tensor(xv)).argmax(1)
    assert (pred == yv).mean() > 0.95                       # standardisation folded into the weights
    p = head.probs(torch.as_tensor(xv))
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)


def test_the_kept_l2_is_the_lowest_valid_nll_of_the_grid():
    xt, yt, xv, yv = _blobs(300, 200, seed=3, noise=60)      # label noise: some L2 beats none
    grid = [1e-5, 1e-2, 1.0, 30.0]
    head, rows = fit_clean_head({"content": xt}, yt, {"content": xv}, yv, grid, len(CLASSES), inputs=["content"])
    assert [r["l2"] for r in rows] == grid
    best = min(rows, key=lambda r: r["valid_nll"])
    assert head.l2 == best["l2"] and head.temperature == pytest.approx(best["temperature"])
    assert len({round(r["valid_nll"], 6) for r in rows}) > 1   # the grid changes the fit


def test_an_empty_grid_is_refused():
    x, y, _, _ = _blobs(30, 0)
    with pytest.raises(ValueError, match="train.clean_head.l2"):
        fit_clean_head({"content": x}, y, {"content": x}, y, [], len(CLASSES), inputs=["content"])


def test_a_head_that_reads_style_uses_what_the_pooled_features_lack():
    """Classes that only the style statistics separate: content alone is near chance, content+style is not."""
    rng = np.random.default_rng(5)
    n = 900
    y = rng.integers(0, 3, n)
    content = rng.normal(0, 1, (n, 12)).astype(np.float32)              # no class information
    style = (rng.normal(0, 1, (n, 4)) + 4 * np.eye(3, 4)[y]).astype(np.float32)
    tr, va = {"content": content[:600], "style": style[:600]}, {"content": content[600:], "style": style[600:]}
    only, _ = fit_clean_head(tr, y[:600], va, y[600:], [1e-2], len(CLASSES), inputs=["content"])
    both, _ = fit_clean_head(tr, y[:600], va, y[600:], [1e-2], len(CLASSES), inputs=["style", "content"])
    assert both.inputs == ("content", "style")                          # the weights' layout, whatever the order asked
    def acc(h):
        return (h.probs(torch.as_tensor(va["content"]), torch.as_tensor(va["style"])).argmax(1) == y[600:]).mean()
    assert acc(only) < 0.5 and acc(both) > 0.95
    assert both.weight.shape == (len(CLASSES), 16)
    with pytest.raises(ValueError, match="style"):                     # a style head never scores content alone
        both.probs(torch.as_tensor(va["content"]))
    with pytest.raises(ValueError, match="style"):
        fit_clean_head({"content": content}, y, {"content": content}, y, [1e-2], len(CLASSES),
                       inputs=["content", "style"])


@pytest.mark.parametrize("bad", [[], ["pixels"], ["content", "content"]])
def test_unknown_or_empty_inputs_are_refused(bad):
    x, y, _, _ = _blobs(30, 0)
    with pytest.raises(ValueError, match="train.clean_head.inputs"):
        fit_clean_head({"content": x}, y, {"content": x}, y, [1e-2], len(CLASSES), inputs=bad)


def test_the_inputs_travel_with_the_head_and_old_files_read_pooled_features():
    w, b = torch.randn(3, 7), torch.randn(3)
    head = CleanHead(w, b, 1.3, 0.01, ("content", "style"))
    desc = head.describe()
    assert desc["inputs"] == ["content", "style"] and "style" in desc["kind"]
    again = CleanHead.from_tensors(head.tensors(), desc)
    assert again.inputs == ("content", "style")
    c, st = torch.randn(2, 5), torch.randn(2, 2)
    np.testing.assert_allclose(again.probs(c, st), head.probs(c, st))
    old = {k: v for k, v in desc.items() if k != "inputs"}                # a model.json from before `inputs`
    old = migrate({"clean_head": old})["clean_head"]
    assert CleanHead.from_tensors({"weight": torch.randn(3, 5), "bias": b}, old).inputs == ("content",)
    with pytest.raises(ValueError, match="inputs"):
        CleanHead.from_tensors(head.tensors(), {**desc, "inputs": ["pixels"]})


def test_mix_is_the_mean_of_both_heads():
    a = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]])
    b = np.array([[0.1, 0.8, 0.1], [0.2, 0.6, 0.2]])
    m = mix(a, b)
    np.testing.assert_allclose(m, [[0.5, 0.425, 0.075], [0.2, 0.65, 0.15]])
    np.testing.assert_allclose(m.sum(1), 1.0)


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
    import svcmodel

    from covid_cxr.model.checkpoint import load_model, save_model

    root = tmp_path_factory.mktemp("twohead")
    try:
        one = svcmodel.build_test_model(root / "one", image_size=64, n_per_class=4, clean_head=False)
    except FileNotFoundError as e:  # the real films are in ../shared
        pytest.skip(f"no test model: {e}")
    m = load_model(one)
    x = np.stack([np.full((64, 64), v, np.uint8) for v in (40, 90, 140, 200)])
    _, feats, _ = m.forward(x)
    # a clean head that strongly prefers the class the trained head likes least for film 0
    worst = int(m.predict(x).probs[0].argmin())
    w = torch.zeros(len(CLASSES), feats.shape[1])
    b = torch.full((len(CLASSES),), -20.0)
    b[worst] = 20.0
    clean = CleanHead(w, b, 1.0, 0.01)
    two = root / "two"
    save_model(m.net, m.meta, two, ood=m.ood, clean=clean)
    return one, two, x, worst


@pytest.fixture(scope="module")
def style_head(two_heads):
    """The same model with a clean head that reads content and style, as the pipeline's does."""
    from covid_cxr.model.checkpoint import load_model, save_model

    one, two, x, _ = two_heads
    m = load_model(one, precision="float32")
    _, feats, style = m.forward(x)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(len(CLASSES), feats.shape[1] + style.shape[1], generator=g) * 0.05
    clean = CleanHead(w, torch.zeros(len(CLASSES)), 1.0, 0.01, ("content", "style"))
    out = two.parent / "style"
    save_model(m.net, m.meta, out, ood=m.ood, clean=clean)
    return one, out, x, clean, feats, style


def test_a_loaded_two_head_model_answers_the_mean_of_both(two_heads):
    from covid_cxr.model.checkpoint import load_model

    one, two, x, worst = two_heads
    m1, m2 = load_model(one), load_model(two)
    assert m1.clean is None and m2.clean is not None
    assert (two / FILE).exists() and "clean_head" in json.loads((two / "model.json").read_text())
    p1, p2 = m1.predict(x), m2.predict(x)
    clean = np.zeros_like(p1.probs)
    clean[:, worst] = 1.0
    np.testing.assert_allclose(p2.probs, (p1.probs + clean) / 2, atol=1e-6)
    np.testing.assert_allclose(p2.logits, p1.logits, rtol=1e-6)   # the trained head is untouched
    if p1.novelty is not None:                                     # and so is the novelty score
        np.testing.assert_allclose(p2.novelty, p1.novelty, rtol=1e-6)
    assert p2.labels[0] == CLASSES[worst]


def test_grad_cam_explains_the_answer_a_two_head_model_gives(two_heads):
    from covid_cxr.model.checkpoint import load_model
    from covid_cxr.model.gradcam import gradcam

    _, two, x, worst = two_heads
    m = load_model(two, channels_last=False, precision="float32")   # Grad-CAM differentiates in float32
    cams, scores, _ = gradcam(m.net, m.to_input(x), None, head=m.cam_head())
    assert cams.shape == (len(x), 64, 64) and np.isfinite(cams).all()
    np.testing.assert_allclose(scores.exp().numpy(), m.predict(x).probs, atol=1e-5)  # log of the mean answer
    assert int(scores[0].argmax()) == worst


def test_a_style_reading_head_answers_and_explains_with_both_inputs(style_head):
    from covid_cxr.model.checkpoint import load_model
    from covid_cxr.model.gradcam import gradcam

    one, out, x, clean, feats, style = style_head
    m1, m = load_model(one, precision="float32"), load_model(out, channels_last=False, precision="float32")
    assert m.clean.inputs == ("content", "style")
    p = m.predict(x).probs
    np.testing.assert_allclose(p, (m1.predict(x).probs + clean.probs(feats, style)) / 2, atol=1e-5)
    assert not np.allclose(clean.probs(feats, style), clean.probs(feats, torch.zeros_like(style)), atol=1e-3)
    xin = m.to_input(x)
    cams, scores, _ = gradcam(m.net, xin, None, head=m.cam_head(xin))
    assert np.isfinite(cams).all()
    np.testing.assert_allclose(scores.exp().numpy(), p, atol=1e-5)   # Grad-CAM explains the answer given
    with pytest.raises(ValueError, match="input batch"):
        m.cam_head()


def test_model_json_naming_a_missing_clean_head_is_refused(two_heads, tmp_path):
    import shutil

    from covid_cxr.model.checkpoint import load_model

    _, two, _, _ = two_heads
    broken = tmp_path / "broken"
    shutil.copytree(two, broken)
    (broken / FILE).unlink()
    with pytest.raises(FileNotFoundError, match="clean head"):
        load_model(broken)
