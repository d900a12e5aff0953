"""Stage `evaluate`: test-split metrics, calibration, plots, report and model card."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

from covid_cxr.config import CLASSES, Paths, load_params


def predict_split(model_dir: Path, paths: Paths, split: str = "test", bs: int = 64) -> dict[str, Any]:
    """Run a saved model over one split of the manifest (shared by evaluate and the champion check)."""
    import pandas as pd
    from covid_cxr.progress import tqdm

    from covid_cxr.data.cache import decoded
    from covid_cxr.model.checkpoint import load_model
    from covid_cxr.evaluation.scoring import concat

    model = load_model(model_dir)
    df = pd.read_csv(paths.manifest)
    df = df[df["split"] == split].reset_index(drop=True)
    if df.empty:
        raise RuntimeError(f"the manifest has no {split!r} rows")
    imgs = decoded(df, model.size, paths.root, paths.cache)
    # Manifest films passed data check's not-an-X-ray rules in `prepare`: no rule to re-apply.
    parts = [model.predict(np.asarray(imgs[i:i + bs]))
             for i in tqdm(range(0, len(df), bs), desc=f"predict {split} ({len(df)})", unit="batch")]
    y = df["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    return {"df": df, "y": y, "pred": concat(parts), "temperature": model.temperature,
            "images": imgs, "model": model, "meta": model.meta}


def score(pred: dict[str, Any], n_bins: int = 15) -> dict[str, Any]:
    from covid_cxr.evaluation.metrics import classification_metrics, ece, softmax

    p = pred["pred"]
    raw = softmax(p.logits)
    cal = p.probs
    m = classification_metrics(pred["y"], cal)
    m["ece_before"] = ece(raw, pred["y"], n_bins)
    m["ece_after"] = ece(cal, pred["y"], n_bins)
    m["temperature"] = float(pred["temperature"])
    m["class_bias"] = pred["meta"].get("class_bias")
    m["clean_head"] = pred["meta"].get("clean_head")
    refer = np.array([v == "refer" for v in p.verdict])
    m["flagged"] = float(refer.mean())
    covid = pred["y"] == 0
    silent = covid & (cal.argmax(1) != 0) & ~refer           # COVID films cleared with verdict ok
    m["silent_covid_miss"] = float(silent.sum() / max(int(covid.sum()), 1))
    m["silent_covid_misses"] = int(silent.sum())
    m["flagged_by_reason"] = {r: float(np.mean([x == r for x in p.reason])) for r in sorted({x for x in p.reason if x})}
    m["novelty_flag_rate"] = float(p.novel.mean())
    ok = ~refer
    m["accuracy_not_flagged"] = float((cal.argmax(1)[ok] == pred["y"][ok]).mean()) if ok.any() else None
    return m


def _calibration(m: dict[str, Any]) -> str:
    s = f"T {m['temperature']:.3f}"
    if m.get("class_bias"):
        s += ", class offsets " + " / ".join(f"{b:+.2f}" for b in m["class_bias"])
    if m.get("clean_head"):   # before: the trained head's raw softmax; after: the mean answer of both heads
        s += f"; mean with the clean head (T {float(m['clean_head']['temperature']):.3f})"
    return s


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

    from covid_cxr.evaluation.metrics import reliability

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
    for probs, name in ((raw, f"before (ECE {m['ece_before']:.4f})"), (cal, f"after calibration "
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
    # the triage trade-off: referral against silent COVID misses, valid (from training) and test
    from covid_cxr.model.verdict import triage_curve

    other = np.array([v == "refer" and r != "covid_not_excluded" for v, r in zip(pred["pred"].verdict,
                                                                               pred["pred"].reason)])
    test_curve = triage_curve(cal, pred["y"], other)
    valid_curve = (pred["meta"].get("triage_fit") or {}).get("valid_curve") or []
    level = pred["meta"]["verdict"]["covid_triage"]
    fig, ax = plt.subplots(figsize=(5.2, 4))
    for curve, name in ((valid_curve, "valid (fitted here)"), (test_curve, "test")):
        if curve:
            ax.plot([100 * r["referred"] for r in curve], [100 * r["silent_miss"] for r in curve], ".-", ms=3,
                    label=name)
    if level is not None:
        ax.plot([100 * m["flagged"]], [100 * m["silent_covid_miss"]], "r*", ms=14,
                label=f"chosen: P(COVID) > {level:.3f} refers")
    ax.set_xlabel("films referred, any reason (%)")
    ax.set_ylabel("COVID films cleared silently (%)")
    ax.set_title("Triage: referral against silent COVID misses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "triage.png", dpi=110)
    plt.close(fig)
    files["triage"] = "img/triage.png"
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
    else:  # the file is a stage output: it exists either way
        fig, ax = plt.subplots(figsize=(3, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified test films", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out / "misclassified.png", dpi=90)
    plt.close(fig)
    files["misclassified"] = "img/misclassified.png"
    return files


def external_section(ext: dict[str, Any] | None, img_prefix: str = "img/") -> list[str]:
    """The "Outside the training sources" section (report and model card), from external.json."""
    lines = ["## Outside the training sources", ""]
    if not ext:
        return lines + ["Not measured: `external.json` is missing (stage `external`).", ""]
    g = ext["groups"]
    conf = ext["confident"]
    lines += [
        "Films from sources that none of the training data comes from (`external.dvc`), scored by the same "
        "code as the service. They are never used to train, calibrate or set a threshold. "
        f"*Flagged* = verdict `refer` (any reason); *confident and wrong* = a wrong label, not referred, "
        f"top probability ≥ {conf}.", "",
        "| group | n | right | flagged | right or flagged | confident and wrong | mean top p | labels given |",
        "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "—" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    negs = {k: v for k, v in g.items() if k.startswith("negatives/")}
    g = {k: v for k, v in g.items() if k not in negs}
    for name, v in g.items():
        mix = ", ".join(f"{c} {100 * s:.0f} %" for c, s in v["label_mix"].items() if s > 0)
        lines.append(f"| {name} | {v['n']} | {fmt(v['right'])} | {fmt(v['flagged'])} | {fmt(v['right_or_flagged'])} "
                     f"| {fmt(v['confident_wrong'])} | {v['mean_top_probability']:.3f} | {mix} |")
    lines += ["", f"![outcomes]({img_prefix}external_outcomes.png)", "",
              f"![examples]({img_prefix}external_examples.png)", ""]
    if negs:
        lines += ["### Images that are not chest films", "",
                  "CT and MR slices, photographs, screenshots and icons from packages the project installs (stage "
                  "`negatives`), sent as uploads are. *Refused*: the decode checks turned them away; otherwise the "
                  "verdict should be `refer` (`not_an_xray`, `not_a_chest_film`, ...).", "",
                  "| kind | n | refused | refused or referred | answered `ok` as | refer reasons |", "|---|---|---|---|---|---|"]
        for name, v in negs.items():
            ok = ", ".join(f"{c} {100 * x:.0f} %" for c, x in v["answered_ok"].items() if x > 0) or "none"
            why = ", ".join(f"{r} {100 * x:.0f} %" for r, x in v["reasons"].items())
            lines.append(f"| {name.split('/', 1)[1]} | {v['n']} | {fmt(v['refused'])} | "
                         f"{fmt(v['refused_or_referred'])} | {ok} | {why} |")
        lines.append("")
    parts = []
    u, tb = g.get("unseen_hospital_normal"), g.get("tuberculosis")
    if u:
        parts.append(f"On Normal films from a hospital it has never seen, the model is right {fmt(u['right'])} of the "
                     f"time and refers {fmt(u['flagged'])}; {fmt(u['confident_wrong'])} get a wrong label with high "
                     "confidence and no warning.")
    if tb:
        parts.append(f"Tuberculosis is none of its three classes, so every label it gives is wrong: it refers "
                     f"{fmt(tb['flagged'])} of those films and is confidently wrong on {fmt(tb['confident_wrong'])}.")
    parts.append("A refer verdict is a safeguard, not a guarantee: a film that is not referred can still be wrong, "
                 "and these figures come from a few hundred films of three sources; another hospital can differ. "
                 "Measure on your own films before any use.")
    return lines + [" ".join(parts), ""]


def probes_section(p: dict[str, Any] | None, accuracy: float) -> list[str]:
    if not p:
        return []
    return [
        "## Shortcut probes (reported, not gated)", "",
        f"The central lung field is the box {p['lung_box']} (top, bottom, left, right; "
        f"{100 * p['box_area_share']:.0f} % of the image).", "",
        "| probe | value |", "|---|---|",
        f"| test accuracy, whole film | {accuracy:.4f} |",
        f"| test accuracy, lung field blanked | {p['accuracy_lung_blanked']:.4f} |",
        f"| test accuracy, outside of the lung field blanked | {p['accuracy_outside_blanked']:.4f} |",
        f"| Grad-CAM mass inside the lung field (mean / median of {p.get('cam_films', 'all')} films) | "
        f"{p['cam_mass_in_lung_mean']:.3f} / {p['cam_mass_in_lung_median']:.3f} |",
        "",
        "Chance is about 0.33–0.44 here. An accuracy well above chance with the lungs blanked means the model "
        "reads something besides the lungs (borders, markers, the source's look) — the shortcut this dataset "
        "is known for. Labels given with the lungs blanked: "
        + ", ".join(f"{c} {100 * v:.0f} %" for c, v in p["label_mix_lung_blanked"].items()) + ".", ""]


def _report(m: dict[str, Any], files: dict[str, str], pred, cal, meta, ext=None) -> str:
    lines = [
        "# Evaluation report (test split)", "",
        f"Model `{meta.get('arch')}` @ {meta.get('image_size')} px, data md5 `{meta.get('data_md5')}`, "
        f"params hash `{meta.get('params_hash')}`, profile `{meta.get('params', {}).get('profile')}`.", "",
        "| metric | value |", "|---|---|",
        f"| images | {m['n_test']} |",
        f"| accuracy | {m['accuracy']:.4f} |",
        f"| macro-F1 | {m['macro_f1']:.4f} |",
        f"| COVID sensitivity (recall) | {m['covid_recall']:.4f} |",
        f"| COVID specificity | {m['covid_specificity']:.4f} |",
        f"| ROC-AUC (macro, one-vs-rest) | {m['roc_auc']['macro']:.4f} |",
        f"| ECE before / after calibration ({_calibration(m)}) | {m['ece_before']:.4f} / {m['ece_after']:.4f} |",
    ]
    lines.append(f"| referred (verdict refer, any reason) | {m['flagged']:.4f} "
                 f"({', '.join(f'{k} {v:.4f}' for k, v in m['flagged_by_reason'].items()) or 'none'}) |")
    lines.append(f"| COVID films cleared silently (answered Normal or VP, verdict ok) | {m['silent_covid_miss']:.4f} "
                 f"({m['silent_covid_misses']} films) |")
    if m.get("accuracy_not_flagged") is not None:
        lines.append(f"| accuracy on the films not referred | {m['accuracy_not_flagged']:.4f} |")
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support | ROC-AUC |", "|---|---|---|---|---|---|"]
    for c in CLASSES:
        pc = m["per_class"][c]
        lines.append(f"| {c} | {pc['precision']:.4f} | {pc['recall']:.4f} | {pc['f1']:.4f} | {pc['support']} | "
                     f"{m['roc_auc'][c]:.4f} |")
    lines += ["", "## Plots", ""]
    for k in ("confusion", "roc", "reliability"):
        lines.append(f"![{k}]({files[k]})")
    level = meta["verdict"]["covid_triage"]
    lines += ["", "## Triage operating point", "",
              "A COVID film answered Normal or Viral Pneumonia with verdict `ok` is cleared silently. The triage "
              "level refers such an answer when its P(COVID) is above it (reason `covid_not_excluded`); it was "
              "chosen on the validation split to minimise `verdict.triage.miss_cost` x silent misses + referrals. "
              "The curve is every level's trade-off; the star is the chosen level on test.", "",
              f"Chosen level: {'none (no triage)' if level is None else f'P(COVID) > {level:.4f}'}; on test: "
              f"{100 * m['flagged']:.1f} % referred, {100 * m['silent_covid_miss']:.2f} % of COVID films cleared "
              "silently.", "", f"![triage]({files['triage']})"]
    lines += [""] + external_section(ext) + probes_section(m.get("shortcut_probes"), m["accuracy"])
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
    from covid_cxr.evaluation.metrics import reliability, roc_points, softmax
    from covid_cxr.evaluation.modelcard import write_model_card

    t0 = time.perf_counter()
    paths = paths or Paths()
    params = params if params is not None else load_params(paths.root / "params.yaml")
    n_bins = int(params["evaluate"]["ece_bins"])
    pred = predict_split(paths.model_dir, paths, "test")
    m = score(pred, n_bins)
    from covid_cxr.evaluation.probes import shortcut_probes

    m["shortcut_probes"] = shortcut_probes(pred["model"], np.asarray(pred["images"]), pred["y"],
                                           params["evaluate"]["lung_box"], params["evaluate"]["cam_films"])
    ext_file = paths.eval_dir / "external.json"
    ext = json.loads(ext_file.read_text()) if ext_file.exists() else None
    raw, cal = softmax(pred["pred"].logits), pred["pred"].probs
    out = paths.eval_dir
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    _write_csv(out / "plots" / "confusion.csv",
               [{"actual": CLASSES[a], "predicted": CLASSES[b]} for a, b in zip(pred["y"], cal.argmax(1))])
    _write_csv(out / "plots" / "roc.csv", roc_points(pred["y"], cal))
    _write_csv(out / "plots" / "reliability.csv", reliability(cal, pred["y"], n_bins))
    pp = pred["pred"]
    df = pred["df"]
    _write_csv(out / "predictions.csv", [   # also the reference `covid-cxr monitor` compares served films with
        {"path": p, "label": CLASSES[y], "pred": CLASSES[c.argmax()],
         **{f"p_{k}": round(float(v), 5) for k, v in zip(CLASSES, c)},
         "novelty": None if pp.novelty is None else round(float(pp.novelty[i]), 4),
         "verdict": pp.verdict[i], "reason": pp.reason[i] or "",
         "width": int(df["width"][i]), "height": int(df["height"][i]), "mode": df["mode"][i]}
        for i, (p, y, c) in enumerate(zip(df["path"], pred["y"], cal))])
    files = _plots(pred, m, raw, cal, out / "img", n_bins, paths.root)
    (out / "report.md").write_text(_report(m, files, pred, cal, pred["meta"], ext))
    write_model_card(paths.model_card, pred["meta"], m, external_section(ext, "eval/img/"))
    typer.secho(f"✔ test: acc {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  COVID recall "
                f"{m['covid_recall']:.4f}  ECE {m['ece_before']:.4f} -> {m['ece_after']:.4f}  "
                f"({time.perf_counter() - t0:.0f} s)  report: {out / 'report.md'}", fg=typer.colors.GREEN)
    return m


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd() -> None:
        """Evaluate artifacts/model on the test split: metrics, plots, report, model card."""
        evaluate()
