"""`dvc plots show` works offline: Vega is inlined in the page template, and ROC has one line per class.

.dvc/config sets plots.html_template = plots/offline.html (built by .dvc/plots/vendor/build.py);
dvc.yaml renders roc.csv with .dvc/plots/roc_by_class.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DVC_DIR = REPO / ".dvc"
VENDOR = DVC_DIR / "plots" / "vendor"
DVC = Path(sys.executable).with_name("dvc")

CLASSES = ("COVID", "Normal", "Viral Pneumonia")
CURVES = {"train/loss": (1.2, 0.8, 0.6, 0.5, 0.45), "valid/loss": (1.0, 0.7, 0.6, 0.55, 0.5),
          "valid/accuracy": (0.6, 0.8, 0.9, 0.93, 0.95)}
TITLES = {"train/loss": "Training loss per epoch", "valid/loss": "Validation loss per epoch",
          "valid/accuracy": "Validation accuracy per epoch"}
OUTCOMES = ("right", "referred", "wrong, not confident", "confidently wrong")
SCRIPT = re.compile(r"<script\b([^>]*)>(.*?)</script>", re.S | re.I)


def html_template() -> Path:
    from configobj import ConfigObj

    rel = ConfigObj(str(DVC_DIR / "config"))["plots"]["html_template"]
    return (DVC_DIR / rel).resolve()  # DVC resolves it against .dvc/


def scripts(html: str) -> list[tuple[str, str]]:
    return SCRIPT.findall(html)


def assert_offline_page(html: str) -> None:
    """No script loaded from anywhere; the three vendored builds inlined byte for byte, in load order."""
    manifest = json.loads((VENDOR / "vendor.json").read_text())
    tags = scripts(html)
    assert not [a for a, _ in tags if "src" in a.lower()], "a <script src=...> needs the network"
    assert not re.search(r"<(script|link)\b[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", html, re.I)
    vendored = [(re.search(r'data-vendored="([^"]+)"', a).group(1), body) for a, body in tags if "data-vendored" in a]
    assert [n for n, _ in vendored] == [f"{k}@{v['version']}" for k, v in manifest.items()]
    for (name, body), (pkg, meta) in zip(vendored, manifest.items()):
        assert hashlib.sha256(body.encode()).hexdigest() == meta["sha256"], f"{name} differs from the vendored build"


def sample_plots(root: Path) -> None:
    """Small plot files with three clearly different ROC curves (artifacts/ is the pipeline's)."""
    d = root / "artifacts" / "eval" / "plots"
    d.mkdir(parents=True, exist_ok=True)
    rows = ["class,fpr,tpr"]
    for cls, a in zip(CLASSES, (0.08, 0.3, 0.7)):
        rows += [f"{cls},{i / 20},{(i / 20) ** a:.4f}" for i in range(21)]
    (d / "roc.csv").write_text("\n".join(rows) + "\n")
    (d / "confusion.csv").write_text("actual,predicted\n" + "".join(f"{c},{c}\n" for c in CLASSES * 3))
    (d / "reliability.csv").write_text("bin,lo,hi,confidence,accuracy,count\n0,0.5,0.75,0.6,0.5,4\n1,0.75,1.0,0.9,0.9,9\n")
    # the external stage's outcomes, as external.outcome_shares writes them: each group adds up to 1
    shares = {"tuberculosis": (0.0, 0.54, 0.07, 0.39), "unseen_hospital_normal": (0.22, 0.755, 0.015, 0.01)}
    (d / "external.csv").write_text("group,outcome,rank,share\n" + "".join(
        f"{g},\"{o}\",{j},{v}\n" for g, vals in shares.items() for j, (o, v) in enumerate(zip(OUTCOMES, vals))))
    # the train stage's DVCLive curves (artifacts/train/plots/metrics/<name>.tsv), five epochs
    live = root / "artifacts" / "train" / "plots" / "metrics"
    for name, values in CURVES.items():
        f = live / f"{name}.tsv"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"step\t{name.split('/')[-1]}\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """`dvc plots show` in a copy of the project (dvc.yaml, params.yaml, .dvc/) with sample plot data."""
    root = tmp_path_factory.mktemp("plots") / "proj"
    root.mkdir()
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / f, root / f)
    shutil.copytree(DVC_DIR, root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    (root / ".dvc" / "config.local").write_text("[core]\n    no_scm = true\n")
    sample_plots(root)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([str(DVC), "plots", "show", "-o", "out"], cwd=root, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return root / "out" / "index.html"


def test_config_points_at_the_offline_template():
    t = html_template()
    assert t.is_file() and t == (DVC_DIR / "plots" / "offline.html").resolve()
    page = t.read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # no placeholder: dvc-render adds no CDN tags
    assert_offline_page(page)


def test_vendored_versions_are_the_ones_dvc_render_pins():
    """dvc-render's own page loads these from the CDN; upgrading it needs a rebuild (vendor/build.py)."""
    from dvc_render.vega import VegaRenderer

    pinned = dict(re.findall(r"cdn\.jsdelivr\.net/npm/([a-z-]+)@([0-9.]+)", VegaRenderer.SCRIPTS))
    manifest = json.loads((VENDOR / "vendor.json").read_text())
    assert {k: v["version"] for k, v in manifest.items()} == pinned
    assert all(v["license"] == "BSD-3-Clause" and (VENDOR / f"LICENSE-{k}").is_file() for k, v in manifest.items())


def test_vendored_code_stays_small():
    assert html_template().stat().st_size < 1_500_000


def test_dvc_plots_show_writes_an_offline_page(rendered):
    html = rendered.read_text(encoding="utf-8")
    assert_offline_page(html)
    assert "cdn.jsdelivr.net" not in "".join(a for a, _ in scripts(html))


def _specs(html: str) -> list[dict]:
    return [json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", html, re.S)]


def test_roc_is_drawn_per_class(rendered):
    [roc] = [s for s in _specs(rendered.read_text(encoding="utf-8")) if "ROC" in json.dumps(s.get("title"))]
    line = roc["layer"][-1]
    assert line["encoding"]["color"]["field"] == "class"
    assert line["encoding"]["x"]["field"] == "fpr" and line["encoding"]["y"]["field"] == "tpr"
    assert sorted({d["class"] for d in line["data"]["values"]}) == list(CLASSES)


def test_training_curves_are_plotted_per_epoch(rendered):
    specs = _specs(rendered.read_text(encoding="utf-8"))
    for name, values in CURVES.items():
        [spec] = [s for s in specs if TITLES[name] in json.dumps(s.get("title"))]
        rows = [d for d in _values(spec) if "step" in d]
        assert [int(d["step"]) for d in rows] == list(range(len(values)))
        assert [float(d[name.split("/")[-1]]) for d in rows] == list(values)


def _values(spec: dict) -> list[dict]:
    out: list[dict] = []
    stack = [spec]
    while stack:
        s = stack.pop()
        if isinstance(s, dict):
            if isinstance(s.get("data"), dict) and isinstance(s["data"].get("values"), list):
                out += s["data"]["values"]
            stack += list(s.values())
        elif isinstance(s, list):
            stack += s
    return out


def _title(spec: dict) -> str:
    t = spec.get("title")
    return t.get("text", "") if isinstance(t, dict) else str(t or "")


def test_no_title_is_a_file_path(rendered):
    titles = [_title(s) for s in _specs(rendered.read_text(encoding="utf-8"))]
    assert len(titles) >= 7 and all(titles), titles
    assert not [t for t in titles if "/" in t or re.search(r"\.(csv|tsv|json)\b", t)], titles


def test_no_stacked_share_is_above_one(rendered):
    [ext] = [s for s in _specs(rendered.read_text(encoding="utf-8")) if "Outside the training sources" in _title(s)]
    totals: dict = {}
    for d in _values(ext):
        totals[(d.get("rev"), d["group"])] = totals.get((d.get("rev"), d["group"]), 0.0) + float(d["share"])
    assert totals and all(abs(v - 1.0) < 1e-6 for v in totals.values()), totals   # the whole group, no more
    assert ext["spec"]["encoding"]["x"]["stack"] == "zero" and ext["spec"]["encoding"]["x"]["scale"]["domain"] == [0, 1]


def test_the_confusion_matrix_shows_its_counts(rendered):
    [cm] = [s for s in _specs(rendered.read_text(encoding="utf-8")) if "Confusion" in _title(s)]
    text = [layer for layer in cm["spec"]["layer"] if (layer["mark"] if isinstance(layer["mark"], str)
                                                       else layer["mark"]["type"]) == "text"]
    assert text and text[0]["encoding"]["text"]["field"] == "films"
    count = next(t for t in cm["spec"]["transform"] if "aggregate" in t)["aggregate"][0]
    assert count == {"op": "count", "as": "films"}


def test_the_reliability_diagram_has_its_diagonal(rendered):
    [rel] = [s for s in _specs(rendered.read_text(encoding="utf-8")) if "Reliability" in _title(s)]
    diag = [lay for lay in rel["layer"] if lay.get("data", {}).get("values") == [{"p": 0}, {"p": 1}]]
    assert diag and diag[0]["encoding"]["x"]["field"] == diag[0]["encoding"]["y"]["field"] == "p"
    points = rel["layer"][-1]["encoding"]
    assert points["x"]["axis"]["tickCount"] <= 6 and points["y"]["axis"]["tickCount"] <= 6   # ticks that do not overlap


def test_roc_template_is_referenced_by_the_roc_plot():
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]["plots"]
    roc = next(p for p in plots if "artifacts/eval/plots/roc.csv" in p)["artifacts/eval/plots/roc.csv"]
    assert roc["template"] == "roc_by_class" and (DVC_DIR / "plots" / "roc_by_class.json").is_file()


def _shot(rendered: Path, tmp_path: Path, marker: str):
    """Headless Chromium with every host unresolvable and a dead proxy, on the page's one plot whose
    div names `marker`: -> RGB pixels (int)."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("no chromium")
    import numpy as np
    from PIL import Image

    one = tmp_path / "one.html"
    html = rendered.read_text(encoding="utf-8")
    divs = re.findall(r'<div id = "[^"]*">.*?</div>', html, re.S)
    [div] = [d for d in divs if marker in d]
    head = html.rsplit("<body>", 1)[0]  # the last one: the inlined code may spell "<body>" too
    one.write_text(f"{head}<body>{div}</body></html>", encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
                    "--proxy-server=127.0.0.1:9", "--window-size=600,450", "--virtual-time-budget=8000",
                    f"--screenshot={shot}", one.as_uri()], capture_output=True, timeout=120, check=True)
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


def _count(px, hexcol: str) -> int:
    import numpy as np

    rgb = np.array([int(hexcol[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(px - rgb).sum(axis=2) < 60).sum())


@pytest.mark.e2e
def test_page_draws_three_roc_lines_in_chromium_without_network(rendered, tmp_path):
    """The ROC lines are painted in the first three colours of Vega's category scale."""
    px = _shot(rendered, tmp_path, "ROC")
    for hexcol in ("#4c78a8", "#f58518", "#e45756"):  # tableau10: COVID, Normal, Viral Pneumonia
        n = _count(px, hexcol)
        assert n > 150, f"{hexcol}: {n} pixels (no line?)"


@pytest.mark.e2e
def test_page_draws_the_training_curves_in_chromium_without_network(rendered, tmp_path):
    """Each DVCLive curve (train loss, valid loss, valid accuracy) is a painted line."""
    for name in CURVES:
        px = _shot(rendered, tmp_path, TITLES[name])
        n = _count(px, "#945dd6")  # DVC's colour for the workspace revision
        assert n > 100, f"{name}: {n} pixels of line (nothing drawn?)"
