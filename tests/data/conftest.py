"""Fixtures for the data tests: tiny generated projects and a few real batch-001 images."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import imgfactory  # noqa: E402

KAGGLE = imgfactory.KAGGLE


@pytest.fixture
def params() -> dict:
    """The project's real params.yaml."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def project(tmp_path, params, monkeypatch):
    """An empty project root (params.yaml, data/<Kaggle root>/) that `Paths()` resolves to."""
    root = tmp_path / "proj"
    (root / "data" / KAGGLE).mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("COVID_CXR_ROOT", str(root))
    return root


@pytest.fixture
def data_dir(project) -> Path:
    """data/ with two generated films per class (seeds 100..105)."""
    data = project / "data"
    seed = 100
    for cls in ("COVID", "Normal", "Viral Pneumonia"):
        for i in range(2):
            imgfactory.png_gray(imgfactory.kaggle_dir(data, cls) / f"{cls}-{i}.png", seed=seed)
            seed += 1
    return data


@pytest.fixture
def real_images():
    imgs = imgfactory.real_images(2)
    if not imgs:
        pytest.skip(f"{imgfactory.BATCH_001} is not available (set COVID_CXR_SHARED or put shared/ beside the checkout)")
    return imgs
