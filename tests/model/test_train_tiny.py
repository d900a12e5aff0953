"""A tiny real training run (real X-rays, 64 px, one short epoch per phase) with the network blocked."""
import json

import numpy as np
import torch
from safetensors.torch import load_file

from covid_cxr.config import CLASSES, Paths
from covid_cxr.model.checkpoint import load_model
from covid_cxr.data.preprocess import load_gray


def test_training_touches_no_network(trained_tiny):
    _, _, attempts = trained_tiny
    assert attempts == []


def test_artifacts_are_weights_only_and_complete(trained_tiny):
    root, meta, _ = trained_tiny
    d = Paths(root).model_dir
    assert sorted(p.name for p in d.iterdir()) == ["clean_head.safetensors", "input_gate.safetensors",
                                                   "model.json", "model.safetensors", "ood.safetensors"]
    sd = load_file(str(d / "model.safetensors"))  # safetensors: no pickle involved
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    mj = json.loads((d / "model.json").read_text())
    for key in ("arch", "classes", "image_size", "normalize", "temperature", "data_md5", "params", "ood",
                "verdict", "clean_head", "input_gate", "inference"):
        assert key in mj
    from covid_cxr.model.modelmeta import SCHEMA
    from covid_cxr.model.precision import cpu_has_bf16

    assert mj["schema"] == SCHEMA
    # answers and thresholds in the precision params.yaml train.inference chose for this machine
    assert mj["inference"]["precision"] == ("bfloat16" if cpu_has_bf16() else "float32")
    # a pure function of data, code and params: the per-run facts go to logs/runs/train.json
    assert not {"git_sha", "trained_at", "timings_s"} & set(mj)
    run = json.loads((root / "logs" / "runs" / "train.json").read_text())
    assert run["stage"] == "train" and run["total_s"] > 0 and "decode cache" in run["timings_s"]
    assert mj["classes"] == list(CLASSES) and mj["image_size"] == 64 and mj["params"]["profile"] == "smoke"
    assert mj["temperature"] > 0 and np.isfinite(mj["ood"]["threshold"])
    # train.calibration decides whether one logit offset per class (mean zero) travels with T
    import yaml

    kind = yaml.safe_load((root / "params.yaml").read_text())["train"]["calibration"]
    if kind == "temperature":
        assert mj["class_bias"] is None
    else:
        assert len(mj["class_bias"]) == len(CLASSES) and abs(sum(mj["class_bias"])) < 1e-6
    # the novelty model has both parts, each scaled by its valid quantile; refer thresholds travel with it
    import yaml

    parts = yaml.safe_load((root / "params.yaml").read_text())["verdict"]["novelty_parts"]
    assert set(mj["ood"]["scales"]) == set(parts) and all(v > 0 for v in mj["ood"]["scales"].values())
    # ... combined as params.yaml says (verdict.combine)
    assert mj["ood"]["combine"] == yaml.safe_load((root / "params.yaml").read_text())["verdict"]["combine"]
    assert "novelty_threshold" not in mj["verdict"]   # one home: ood.threshold
    # the clean head reads what params.yaml names (train.clean_head.inputs), and its weights match that width
    inputs = yaml.safe_load((root / "params.yaml").read_text())["train"]["clean_head"]["inputs"]
    assert mj["clean_head"]["inputs"] == [i for i in ("content", "style") if i in inputs]
    m = load_model(d)
    _, feats, style = m.forward(np.zeros((1, 64, 64), np.uint8))
    width = {"content": feats.shape[1], "style": style.shape[1]}
    assert m.clean.weight.shape[1] == sum(width[i] for i in inputs)
    assert 0 < mj["verdict"]["min_confidence"] < 1


def test_saved_model_reloads_and_predicts_like_training(trained_tiny):
    root, meta, _ = trained_tiny
    m = load_model(Paths(root).model_dir)
    f = sorted((root / "data").rglob("*.png"))[:4]
    x = np.stack([load_gray(p, m.size) for p in f])
    out = m.predict(x)
    assert out.probs.shape == (4, 3)
    np.testing.assert_allclose(out.probs.sum(1), 1.0, rtol=1e-5)
    assert out.novel.dtype == bool and out.novelty.shape == (4,)
    assert set(out.verdict) <= {"ok", "refer"} and len(out.reason) == 4
    again = load_model(Paths(root).model_dir).predict(x)
    np.testing.assert_allclose(out.probs, again.probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.novelty, again.novelty, rtol=1e-5)


def test_evaluate_writes_metrics_plots_report_and_card(trained_tiny):
    from covid_cxr.evaluation.evaluate import evaluate

    root, _, _ = trained_tiny
    p = Paths(root)
    m = evaluate(p)
    assert m["n_test"] == 9
    assert json.loads((p.eval_dir / "metrics.json").read_text())["accuracy"] == m["accuracy"]
    for f in ("img/confusion.png", "img/roc.png", "img/reliability.png", "img/misclassified.png", "report.md",
              "predictions.csv",
              "plots/confusion.csv", "plots/roc.csv", "plots/reliability.csv"):
        assert (p.eval_dir / f).stat().st_size > 0, f
    card = p.model_card.read_text()
    assert "not a diagnostic" in card.lower() or "not for diagnos" in card.lower()
    assert "paediatric" in card and "ECE" in card
    assert "Outside the training sources" in card
    # the card names the novelty parts this model was fitted with, in words
    from covid_cxr.evaluation.modelcard import PART_WORDS

    ood = json.loads((p.model_dir / "model.json").read_text())["ood"]
    for part in ood["scales"]:
        assert PART_WORDS[part] in card
    rule = {"sum": "sum", "max": "largest"}[ood["combine"]]
    assert f"The novelty score is the {rule} of its standardised parts" in card
    if "style" in json.loads((p.model_dir / "model.json").read_text())["clean_head"]["inputs"]:
        assert "logistic regression fitted on the pooled features and early-layer style statistics" in card
    assert 0 <= m["flagged"] <= 1 and "shortcut_probes" in m
    report = (p.eval_dir / "report.md").read_text()
    assert "Shortcut probes" in report and "Outside the training sources" in report


def test_training_curves_go_to_dvclive(trained_tiny):
    """One DVCLive step per unfrozen epoch, with the losses and accuracy fastai recorded (model.json history)."""
    root, meta, _ = trained_tiny
    live = Paths(root).train_curves
    history = meta["history"]
    assert len(history) >= 1
    for name, key in (("train/loss", "train_loss"), ("valid/loss", "valid_loss"), ("valid/accuracy", "valid_accuracy")):
        lines = (live / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        header, rows = lines[0].split("\t"), [r.split("\t") for r in lines[1:]]
        assert header[:2] == ["step", name.split("/")[-1]]
        assert [int(r[0]) for r in rows] == list(range(len(history)))
        assert np.allclose([float(r[1]) for r in rows], [h[key] for h in history])
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == len(history) - 1 and summary["valid"]["accuracy"] == history[-1]["valid_accuracy"]
    assert summary["final"]["valid_accuracy"] == meta["valid_accuracy"]
