"""Stage `evaluate`: test-split metrics, calibration, plots, report and model card."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

from .config import CLASSES, Paths, load_params


def predict_split(model_dir: Path, paths: Paths, split: str = "test", bs: int = 64) -> dict[str, Any]:
    """Run a saved model over one split of the manifest (shared by evaluate and the champion check)."""
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from .datacache import decoded
    from .model_io import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model(model_dir)
    df = pd.read_csv(paths.manifest)
    df = df[df["split"] == split].reset_index(drop=True)
    if df.empty:
        raise RuntimeError(f"the manifest has no {split!r} rows")
    imgs = decoded(df, model.size, paths.root, paths.cache)
    logits, ood = [], []
    for i in tqdm(range(0, len(df), bs), desc=f"predict {split} ({len(df)})", unit="batch"):
        out = model.predict(np.asarray(imgs[i:i + bs]))
        logits.append(out["logits"])
        if "ood_score" in out:
            ood.append(out["ood_score"])
    y = df["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    return {"df": df, "y": y, "logits": np.concatenate(logits), "temperature": model.temperature,
            "ood_score": np.concatenate(ood) if ood else None,
            "ood_threshold": model.ood.threshold if model.ood else None, "meta": model.meta}


def score(pred: dict[str, Any], n_bins: int = 15) -> dict[str, Any]:
    from .metrics import classification_metrics, ece, softmax

    raw = softmax(pred["logits"])
    cal = softmax(pred["logits"], pred["temperature"])
    m = classification_metrics(pred["y"], cal)
    m["ece_before"] = ece(raw, pred["y"], n_bins)
    m["ece_after"] = ece(cal, pred["y"], n_bins)
    m["temperature"] = float(pred["temperature"])
    if pred["ood_score"] is not None:
        m["ood_false_flag_rate"] = float((pred["ood_score"] > pred["ood_threshold"]).mean())
    return m


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["empty"])
        w.writeheader()
        w.writerows(rows)


def _plots(pred, m, raw, cal, out: Path, n_bins: int, root: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from .metrics import reliability

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    # confusion matrix
    cm = np.array(m["confusion"])
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(3), CLASSES, rotation=20)
    ax.set_yticks(range(3), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"Test confusion (acc {m['accuracy']:.4f})")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=110)
    plt.close(fig)
    files["confusion"] = "img/confusion.png"
    # ROC
    fig, ax = plt.subplots(figsize=(4.6, 4))
    for i, c in enumerate(CLASSES):
        yi = (pred["y"] == i).astype(int)
        if 0 < yi.sum() < len(yi):
            fpr, tpr, _ = roc_curve(yi, cal[:, i])
            ax.plot(fpr, tpr, label=f"{c} (AUC {m['roc_auc'][c]:.4f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("One-vs-rest ROC (test)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    files["roc"] = "img/roc.png"
    # reliability
    fig, ax = plt.subplots(figsize=(4.6, 4))
    for probs, name in ((raw, f"before (ECE {m['ece_before']:.4f})"), (cal, f"after T={m['temperature']:.2f} "
                                                                        f"(ECE {m['ece_after']:.4f})")):
        r = reliability(probs, pred["y"], n_bins)
        ax.plot([x["confidence"] for x in r], [x["accuracy"] for x in r], "o-", label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability ({n_bins} bins, test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    files["reliability"] = "img/reliability.png"
    # misclassified examples
    wrong = np.flatnonzero(cal.argmax(1) != pred["y"])
    if len(wrong):
        from PIL import Image

        k = min(len(wrong), 24)
        cols = min(k, 6)
        rows = (k + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
        for a in axes.ravel():
            a.axis("off")
        for a, i in zip(axes.ravel(), wrong[:k]):
            a.imshow(Image.open(root / pred["df"]["path"][i]).convert("L"), cmap="gray")
            a.set_title(f"true {CLASSES[pred['y'][i]]}\npred {CLASSES[cal[i].argmax()]} "
                        f"{cal[i].max():.2f}", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "misclassified.png", dpi=90)
        plt.close(fig)
        files["misclassified"] = "img/misclassified.png"
    return files


def _report(m: dict[str, Any], files: dict[str, str], pred, cal, meta) -> str:
    lines = [
        "# Evaluation report (test split)", "",
        f"Model `{meta.get('arch')}` @ {meta.get('image_size')} px, data md5 `{meta.get('data_md5')}`, "
        f"git `{(meta.get('git_sha') or 'n/a')[:10]}`, profile `{meta.get('params', {}).get('profile')}`.", "",
        "| metric | value |", "|---|---|",
        f"| images | {m['n_test']} |",
        f"| accuracy | {m['accuracy']:.4f} |",
        f"| macro-F1 | {m['macro_f1']:.4f} |",
        f"| COVID sensitivity (recall) | {m['covid_recall']:.4f} |",
        f"| COVID specificity | {m['covid_specificity']:.4f} |",
        f"| ROC-AUC (macro, one-vs-rest) | {m['roc_auc']['macro']:.4f} |",
        f"| ECE before / after temperature ({m['temperature']:.3f}) | {m['ece_before']:.4f} / {m['ece_after']:.4f} |",
    ]
    if "ood_false_flag_rate" in m:
        lines.append(f"| OOD false-flag rate on test | {m['ood_false_flag_rate']:.4f} |")
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support | ROC-AUC |", "|---|---|---|---|---|---|"]
    for c in CLASSES:
        pc = m["per_class"][c]
        lines.append(f"| {c} | {pc['precision']:.4f} | {pc['recall']:.4f} | {pc['f1']:.4f} | {pc['support']} | "
                     f"{m['roc_auc'][c]:.4f} |")
    lines += ["", "## Plots", ""]
    for k in ("confusion", "roc", "reliability"):
        lines.append(f"![{k}]({files[k]})")
    wrong = np.flatnonzero(cal.argmax(1) != pred["y"])
    lines += ["", f"## Misclassified examples ({len(wrong)})", ""]
    if len(wrong):
        lines += [f"![misclassified]({files['misclassified']})", "", "| file | true | predicted | confidence |",
                  "|---|---|---|---|"]
        for i in wrong:
            lines.append(f"| `{pred['df']['path'][i]}` | {CLASSES[pred['y'][i]]} | {CLASSES[cal[i].argmax()]} | "
                         f"{cal[i].max():.3f} |")
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def evaluate(paths: Paths | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    from .metrics import reliability, roc_points, softmax
    from .modelcard import write_model_card

    t0 = time.perf_counter()
    paths = paths or Paths()
    params = params if params is not None else load_params(paths.root / "params.yaml")
    n_bins = int(params.get("evaluate", {}).get("ece_bins", 15))
    pred = predict_split(paths.model_dir, paths, "test")
    m = score(pred, n_bins)
    raw, cal = softmax(pred["logits"]), softmax(pred["logits"], pred["temperature"])
    out = paths.eval_dir
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    _write_csv(out / "plots" / "confusion.csv",
               [{"actual": CLASSES[a], "predicted": CLASSES[b]} for a, b in zip(pred["y"], cal.argmax(1))])
    _write_csv(out / "plots" / "roc.csv", roc_points(pred["y"], cal))
    _write_csv(out / "plots" / "reliability.csv", reliability(cal, pred["y"], n_bins))
    _write_csv(out / "predictions.csv", [
        {"path": p, "label": CLASSES[y], "pred": CLASSES[c.argmax()],
         **{f"p_{k}": round(float(v), 5) for k, v in zip(CLASSES, c)},
         "ood_score": None if pred["ood_score"] is None else round(float(pred["ood_score"][i]), 3)}
        for i, (p, y, c) in enumerate(zip(pred["df"]["path"], pred["y"], cal))])
    files = _plots(pred, m, raw, cal, out / "img", n_bins, paths.root)
    (out / "report.md").write_text(_report(m, files, pred, cal, pred["meta"]))
    write_model_card(paths.model_card, pred["meta"], m)
    typer.secho(f"✔ test: acc {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  COVID recall "
                f"{m['covid_recall']:.4f}  ECE {m['ece_before']:.4f} -> {m['ece_after']:.4f}  "
                f"({time.perf_counter() - t0:.0f} s)  report: {out / 'report.md'}", fg=typer.colors.GREEN)
    return m


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd() -> None:
        """Evaluate artifacts/model on the test split: metrics, plots, report, model card."""
        evaluate()
