"""Stage `external`: how the model behaves on films from outside its training sources.

`external/` (external.dvc) holds films from an unseen hospital, Normals of another database,
and tuberculosis (a disease outside the three classes, label `none`); the negatives (stage
`negatives`) are images that are not chest films at all: CT and MR slices, photographs,
screenshots, icons, scored as uploads are (group `negatives/<kind>`, figure `refused_or_referred`).
They are scored here for measurement only: nothing in the project trains, calibrates or fits a
threshold on them.

Per group (`external/labels.csv`: file, group, label), on the calibrated outputs the service
returns:
- right: share labelled correctly (groups with a known label);
- flagged: share with verdict `refer`, for any reason;
- confident_wrong: share with a wrong label, not flagged, top probability >= `external.confident`
  (for an unlabelled group every label is wrong);
- right_or_flagged, mean top probability, label mix and refer reasons.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

from covid_cxr.config import CLASSES, Paths, load_params
from covid_cxr.data.preprocess import MAX_PIXELS

NONE = "none"  # label of films that belong to none of the classes


def group_summary(labels: list[str], pred: list[str], top: np.ndarray, verdict: list[str],
                  reason: list[str | None], confident: float) -> dict[str, Any]:
    """The figures of one group. `labels[i]` is a class or NONE."""
    n = len(labels)
    y = np.array(labels, dtype=object)
    p = np.array(pred, dtype=object)
    flagged = np.array([v == "refer" for v in verdict])
    right = (p == y) & (y != NONE)
    wrong = ~right
    conf_wrong = wrong & ~flagged & (np.asarray(top) >= confident)
    labelled = bool((y != NONE).any())
    out: dict[str, Any] = {
        "n": n,
        "right": float(right.mean()) if labelled else None,
        "flagged": float(flagged.mean()),
        "confident_wrong": float(conf_wrong.mean()),
        "right_or_flagged": float((right | flagged).mean()) if labelled else None,
        "mean_top_probability": float(np.mean(top)),
        "label_mix": {c: float((p == c).mean()) for c in CLASSES},
        "refer_reasons": {r: float(np.mean([x == r for x in reason])) for r in sorted({x for x in reason if x})},
    }
    return out


OUTCOMES = ("right", "referred", "wrong, not confident", "confidently wrong")   # one per film, exclusive


def outcome_shares(df, preds, confident: float) -> dict[str, list[float]]:
    """Per group (in `df`'s sorted group order), the share of its films in each of OUTCOMES: the four
    add up to 1. Referred (verdict refer, any reason) comes before right or wrong."""
    top = preds.probs.max(1)
    labels = np.array(preds.labels, dtype=object)
    refer = np.array([v == "refer" for v in preds.verdict])
    out: dict[str, list[float]] = {}
    for g in sorted(df["group"].unique()):
        idx = np.flatnonzero(df["group"].to_numpy() == g)
        right = labels[idx] == df["label"].to_numpy()[idx]
        fl, sure = refer[idx], top[idx] >= confident
        out[g] = [float((right & ~fl).mean()), float(fl.mean()), float((~right & ~fl & ~sure).mean()),
                  float((~right & ~fl & sure).mean())]
    return out


def summarise(df, preds, confident: float) -> dict[str, Any]:
    groups = {}
    top = preds.probs.max(1)
    labels_pred = preds.labels
    for g in sorted(df["group"].unique()):
        idx = np.flatnonzero(df["group"].to_numpy() == g)
        groups[g] = group_summary([df["label"].iloc[i] for i in idx], [labels_pred[i] for i in idx], top[idx],
                                  [preds.verdict[i] for i in idx], [preds.reason[i] for i in idx], confident)
    return groups


def _plots(groups: dict[str, Any], df, preds, root: Path, img: Path, confident: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    img.mkdir(parents=True, exist_ok=True)
    names = list(groups)
    shares = outcome_shares(df, preds, confident)
    cols = dict(zip(OUTCOMES, ("#2e7d32", "#f9a825", "#90a4ae", "#c62828")))
    top = preds.probs.max(1)
    fig, ax = plt.subplots(figsize=(7, 0.7 + 0.6 * len(names)))
    left = np.zeros(len(names))
    for j, (k, c) in enumerate(cols.items()):
        v = np.array([shares[g][j] for g in names])
        ax.barh(names, v, left=left, color=c, label=k)
        left += v
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of films")
    ax.set_title("Outside the training sources: what the model answers")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.12), ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(img / "external_outcomes.png", dpi=110)
    plt.close(fig)
    # example films: the first three of each group, with the answer
    k = 3
    fig, axes = plt.subplots(len(names), k, figsize=(2.2 * k, 2.5 * len(names)), squeeze=False)
    for r, g in enumerate(names):
        idx = np.flatnonzero(df["group"].to_numpy() == g)[:k]
        for c in range(k):
            a = axes[r, c]
            a.axis("off")
            if c < len(idx):
                i = idx[c]
                a.imshow(Image.open(root / df["path"].iloc[i]).convert("L"), cmap="gray")
                ans = "REFER" if preds.verdict[i] == "refer" else preds.labels[i]
                a.set_title(f"{g}\n{ans} ({preds.labels[i]} {top[i]:.2f})", fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "external_examples.png", dpi=90)
    plt.close(fig)


def negatives_summary(model, root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score the negative set (stage `negatives`) as uploads are: -> ({"negatives/<kind>": figures},
    one row per file). A file the decode checks refuse (too small, not an image, ...) is refused; the
    share that matters is `refused_or_referred`."""
    from covid_cxr.data.checkfilm import check_film
    from covid_cxr.data.preprocess import ImageError, resize_gray

    neg = root / "artifacts" / "negatives"
    with open(neg / "sources.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    films, rules, idx, out = [], [], [], []
    for i, r in enumerate(rows):
        try:
            f = check_film((neg / r["file"]).read_bytes(), min_side=model.min_side, max_pixels=MAX_PIXELS)
        except ImageError as e:
            out.append({"path": f"artifacts/negatives/{r['file']}", "group": f"negatives/{r['kind']}", "label": NONE,
                        "pred": None, "verdict": "refused", "reason": e.code})
            continue
        films.append(resize_gray(f.gray, model.size))
        rules.append(f.rule)
        idx.append(i)
    verdicts: dict[int, tuple[str, str | None, str]] = {}
    for j in range(0, len(films), 32):
        p = model.predict(np.stack(films[j:j + 32]), not_xray=rules[j:j + 32])
        for k in range(len(p.verdict)):
            verdicts[idx[j + k]] = (p.verdict[k], p.reason[k], p.labels[k])
    for i, (v, reason, label) in verdicts.items():
        r = rows[i]
        out.append({"path": f"artifacts/negatives/{r['file']}", "group": f"negatives/{r['kind']}", "label": NONE,
                    "pred": label, "verdict": v, "reason": reason})
    groups: dict[str, Any] = {}
    for g in sorted({o["group"] for o in out}):
        mine = [o for o in out if o["group"] == g]
        kept = [o for o in mine if o["verdict"] == "ok"]
        groups[g] = {"n": len(mine), "refused": sum(o["verdict"] == "refused" for o in mine) / len(mine),
                     "refused_or_referred": 1 - len(kept) / len(mine),
                     "answered_ok": {c: sum(o["pred"] == c for o in kept) / len(mine) for c in CLASSES},
                     "reasons": {r: sum(o["reason"] == r for o in mine) / len(mine)
                                 for r in sorted({str(o["reason"]) for o in mine if o["reason"]})}}
    return groups, out


def external(paths: Paths | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    import pandas as pd

    from covid_cxr.model.checkpoint import load_model
    from covid_cxr.evaluation.scoring import score_paths

    t0 = time.perf_counter()
    paths = paths or Paths()
    params = params if params is not None else load_params(paths.root / "params.yaml")
    cfg = params["external"]
    ext = paths.root / cfg["root"]
    labels_csv = ext / "labels.csv"
    if not labels_csv.exists():
        raise FileNotFoundError(f"{labels_csv} is missing: run `dvc pull external.dvc`")
    df = pd.read_csv(labels_csv)
    df["path"] = [str(Path(cfg["root"]) / f) for f in df["file"]]
    model = load_model(paths.model_dir)
    preds, ok, errors = score_paths(model, [paths.root / p for p in df["path"]], desc="external")
    if errors:
        raise RuntimeError(f"{len(errors)} external films could not be read, e.g. "
                           f"{df['path'].iloc[next(iter(errors))]}: {next(iter(errors.values())).message}")
    groups = summarise(df, preds, float(cfg["confident"]))
    neg_groups, neg_rows = negatives_summary(model, paths.root)
    out = paths.eval_dir
    (out / "plots").mkdir(parents=True, exist_ok=True)
    result = {"confident": float(cfg["confident"]), "model_image_size": model.size, "groups": {**groups, **neg_groups}}
    (out / "external.json").write_text(json.dumps(result, indent=2))
    pd.concat([pd.DataFrame({
        "path": df["path"], "group": df["group"], "label": df["label"], "pred": preds.labels,
        **{f"p_{c}": np.round(preds.probs[:, i], 5) for i, c in enumerate(CLASSES)},
        "novelty": None if preds.novelty is None else np.round(preds.novelty, 4),
        "gate": None if preds.gate is None else np.round(preds.gate, 4),
        "verdict": preds.verdict, "reason": preds.reason,
    }), pd.DataFrame(neg_rows)]).to_csv(out / "external_predictions.csv", index=False)
    pd.DataFrame([{"group": g, "outcome": k, "rank": j, "share": round(v[j], 4)}
                  for g, v in outcome_shares(df, preds, float(cfg["confident"])).items()
                  for j, k in enumerate(OUTCOMES)]).to_csv(out / "plots" / "external.csv", index=False)
    _plots(groups, df, preds, paths.root, out / "img", float(cfg["confident"]))
    for g, v in groups.items():
        right = "—" if v["right"] is None else f"{v['right']:.3f}"
        typer.echo(f"  {g:<24} n={v['n']:<4} right {right:<6} flagged {v['flagged']:.3f}  "
                   f"confident-and-wrong {v['confident_wrong']:.3f}")
    for g, v in neg_groups.items():
        typer.echo(f"  {g:<24} n={v['n']:<4} refused or referred {v['refused_or_referred']:.3f}")
    typer.secho(f"✔ external: {len(df)} films in {len(groups)} groups, {len(neg_rows)} negatives in "
                f"{len(neg_groups)} kinds ({time.perf_counter() - t0:.0f} s) -> {out / 'external.json'}",
                fg=typer.colors.GREEN)
    return result


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    @app.command("external")
    def external_cmd() -> None:
        """Score the films from outside the training sources (external/) -> artifacts/eval/external.json."""
        external()
