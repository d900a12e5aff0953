"""What the ood_* experiment scripts share: their per-set feature caches, and the one table row they print.

A row judges one rule (probabilities + refer flags per set) the way `external.json` and the test
figures do: flagged = refer for any reason; confidently wrong = wrong, not referred, top ≥ `confident`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from covid_cxr.config import CLASSES
from covid_cxr.evaluation.metrics import COVID, ece

PHOTOS = ("china.jpg", "flower.jpg")  # scikit-learn's sample photographs, in greyscale: must refer

HEADER = ("| rule | valid flagged | test acc | COVID recall | test ECE | test flagged | unseen right | unseen flagged "
          "| unseen conf-wrong | unseen right or flagged | TB flagged | TB conf-wrong | other right |\n"
          + "|---" * 13 + "|")


def external_labels(ext, groups) -> dict[str, np.ndarray]:
    """Class index per external film of each group; -1 where the truth is none of the classes (TB)."""
    return {g: np.array([CLASSES.index(x) if x in CLASSES else -1 for x in ext[ext["group"] == g]["label"]])
            for g in groups}


def model_key(model_dir: Path) -> str:
    """A cache key for one trained model: the first 12 hex digits of a SHA-1 over everything a cached
    score reads: every weights file (body, novelty model, clean head) and the calibration and refer
    thresholds of model.json (schema 2 keeps the novelty threshold in `ood`, so it is hashed too;
    schema-1 files keep the key their caches were written under). Two models with one body but
    another clean head get two keys."""
    import hashlib
    import json

    model_dir = Path(model_dir)
    h = hashlib.sha1()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.name.encode() + f.read_bytes())
    meta = json.loads((model_dir / "model.json").read_text())
    keys = ("temperature", "class_bias", "verdict") + (("ood",) if int(meta.get("schema", 1)) >= 2 else ())
    h.update(json.dumps({k: meta.get(k) for k in keys}, sort_keys=True).encode())
    return h.hexdigest()[:12]


def truths(root: Path, manifest: Path, splits=("train", "valid", "test")):
    """-> (manifest frame, external labels frame, external groups, {set: class index per film}) for the
    splits, every external group (-1 = none of the classes) and PHOTOS (-1)."""
    import pandas as pd

    df = pd.read_csv(manifest)
    y_all = df["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    ext = pd.read_csv(Path(root) / "external" / "labels.csv")
    groups = sorted(ext["group"].unique())
    ys = {s: y_all[df["split"].to_numpy() == s] for s in splits}
    ys.update(external_labels(ext, groups))
    ys["photos"] = np.full(len(PHOTOS), -1)
    return df, ext, groups, ys


def grey_photos(size: int) -> np.ndarray:
    """(2, size, size) uint8: PHOTOS made grey and decoded as an upload is (scoring.load_film)."""
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_image

    from covid_cxr.evaluation.scoring import load_film

    films = []
    for name in PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(load_sample_image(name)).convert("L").save(buf, "PNG")
        films.append(load_film(buf.getvalue(), size, 64)[0])
    return np.stack(films)


def external_films(root: Path, ext, group: str, size: int) -> np.ndarray:
    """(n, size, size) uint8: one external group's films, in labels.csv order, decoded as uploads are."""
    from covid_cxr.evaluation.scoring import load_film

    return np.stack([load_film(Path(root) / "external" / f, size, 64)[0] for f in ext[ext["group"] == group]["file"]])


def score_sets(score: Callable[[np.ndarray], dict[str, np.ndarray]], size: int, paths, df, ext, groups,
               splits=("valid", "test")) -> dict[str, dict[str, np.ndarray]]:
    """`{set: score(films)}` for the manifest's splits (decoded as training does) and every external group
    (decoded as uploads are), at the model's input `size`."""
    from covid_cxr.data.cache import decoded

    sets = {s: score(decoded(df[df["split"] == s].reset_index(drop=True), size, paths.root, paths.cache))
            for s in splits}
    for g in groups:
        sets[g] = score(external_films(paths.root, ext, g, size))
    return sets


def cache_path(root: Path, kind: str, model_dir: Path, suffix: str = "") -> Path:
    """Where one experiment script (`kind`) keeps one model's scored sets: .cache/<kind>/<model_key><suffix>.npz."""
    return Path(root) / ".cache" / kind / f"{model_key(model_dir)}{suffix}.npz"


def cached_sets(root: Path, kind: str, model_dir: Path, compute: Callable[[], dict[str, dict[str, np.ndarray]]],
                suffix: str = "") -> dict[str, dict[str, np.ndarray]]:
    """One model's scored sets from `cache_path`, or `compute()`d and saved there."""
    cache = cache_path(root, kind, model_dir, suffix)
    sets = load_sets(cache)
    if sets is None:
        sets = compute()
        save_sets(cache, sets)
    return sets


def load_sets(cache: Path) -> dict[str, dict[str, np.ndarray]] | None:
    """`{set: {field: array}}` from a cache written by `save_sets`, or None when there is none."""
    if not cache.exists():
        return None
    z = np.load(cache)
    sets: dict[str, dict[str, np.ndarray]] = {}
    for name in z.files:
        s, f = name.split("/")
        sets.setdefault(s, {})[f] = z[name]
    return sets


def save_sets(cache: Path, sets: dict[str, dict[str, np.ndarray]]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"{s}/{f}": v for s, d in sets.items() for f, v in d.items()})


def row(name: str, rule: Callable[[str, str], tuple[np.ndarray, np.ndarray]], sets, ys: dict[str, np.ndarray],
        confident: float) -> str:
    """One markdown row for `rule(name, set) -> (probs, refer)` over valid, test and the external groups."""
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    fig = {}
    for s in sets:
        p, refer = rule(name, s)
        right = p.argmax(1) == ys[s]
        fig[s] = dict(flagged=refer.mean(), right=right.mean(), rof=(right | refer).mean(),
                      cw=(~right & ~refer & (p.max(1) >= confident)).mean())
    pt, yt = rule(name, "test")[0], ys["test"]
    rec = float((pt.argmax(1)[yt == COVID] == COVID).mean())
    u, tb, on = fig["unseen_hospital_normal"], fig["tuberculosis"], fig["other_normal"]
    return (f"| {name} | {pct(fig['valid']['flagged'])} | {fig['test']['right']:.4f} | {rec:.4f} "
            f"| {ece(pt, yt, 15):.4f} | {pct(fig['test']['flagged'])} | {pct(u['right'])} | {pct(u['flagged'])} "
            f"| {pct(u['cw'])} | {pct(u['rof'])} | {pct(tb['flagged'])} | {pct(tb['cw'])} | {pct(on['right'])} |")
