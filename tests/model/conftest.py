"""A tiny real project: a few real X-rays, a manifest, and the smoke training profile."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
import yaml

REPO = Path(__file__).resolve().parents[2]

PER_CLASS = {"train": 6, "valid": 3, "test": 3}


def _tiny_project(root: Path, shared: Path) -> Path:
    rows = []
    for cls in ("COVID", "Normal", "Viral Pneumonia"):
        files = sorted((shared / "incoming" / "batch-001" / cls).glob("*.png"))[: sum(PER_CLASS.values())]
        it = iter(files)
        for split, n in PER_CLASS.items():
            for _ in range(n):
                f = next(it)
                dst = root / "data" / "COVID-19_Radiography_Dataset" / cls / "images" / f.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dst)
                with Image.open(dst) as im:   # the columns `prepare` writes that later stages read
                    w, h, mode = im.width, im.height, im.mode
                rows.append({"path": dst.relative_to(root).as_posix(), "label": cls, "split": split,
                             "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(), "width": w, "height": h,
                             "mode": mode})
    (root / "artifacts" / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "artifacts" / "data" / "manifest.csv", index=False)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["profile"] = "smoke"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, shared_dir):
    """Train the smoke profile once per session, with every socket connection refused."""
    import socket

    from covid_cxr.config import Paths, load_params
    from covid_cxr.model.train import train

    root = _tiny_project(tmp_path_factory.mktemp("tiny"), shared_dir)
    attempts: list = []

    def refuse(*a, **k):
        attempts.append(a)
        raise OSError("network access is blocked in this test")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(socket, "getaddrinfo", refuse)
    try:
        meta = train(Paths(root), load_params(root / "params.yaml"))
    finally:
        mp.undo()
    return root, meta, attempts
