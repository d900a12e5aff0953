"""data import: Kaggle folder, flat folder, zip; skips, identical files, name conflicts."""
from __future__ import annotations

import zipfile
from pathlib import Path

import imgfactory as fx
import pytest
from typer.testing import CliRunner

from covid_cxr.cli import app
from covid_cxr.dataimport import import_source, import_tree

KAGGLE = fx.KAGGLE


def images_in(data: Path) -> dict[str, bytes]:
    base = data / KAGGLE
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def kaggle_source(root: Path) -> Path:
    """A miniature Kaggle download: images, masks, Lung_Opacity, metadata and a README."""
    src = root / KAGGLE
    fx.png_gray(src / "COVID" / "images" / "COVID-1.png", seed=1)
    fx.png_gray(src / "COVID" / "masks" / "COVID-1.png", seed=2)
    fx.png_gray(src / "Normal" / "images" / "Normal-1.png", seed=3)
    fx.png_gray(src / "Viral Pneumonia" / "images" / "Viral Pneumonia-1.png", seed=4)
    fx.png_gray(src / "Lung_Opacity" / "images" / "Lung_Opacity-1.png", seed=5)
    fx.text_file(src / "COVID.metadata.xlsx")
    fx.text_file(src / "Normal.metadata.xlsx")
    fx.text_file(src / "README.md.txt")
    return root


def test_kaggle_folder(project, tmp_path):
    data = project / "data"
    src = kaggle_source(tmp_path / "dl")
    res = import_tree(src, data)
    assert sorted(Path(p).relative_to(data / KAGGLE).as_posix() for p in res["added"]) == [
        "COVID/images/COVID-1.png", "Normal/images/Normal-1.png", "Viral Pneumonia/images/Viral Pneumonia-1.png",
    ]
    assert res["skipped"] == {"masks/": 1, "Lung_Opacity/": 1, "*.xlsx": 2, "README/licence": 1}
    assert res["conflicts"] == [] and res["skipped_identical"] == []
    got = images_in(data)
    assert got["COVID/images/COVID-1.png"] == (src / KAGGLE / "COVID/images/COVID-1.png").read_bytes()
    assert not any("mask" in k or "Lung" in k for k in got)


def test_flat_layout_case_insensitive_classes(project, tmp_path, real_images):
    data = project / "data"
    src = tmp_path / "flat"
    fx.copy_real(real_images, src, per_class=2, layout="flat")
    (src / "COVID").rename(src / "covid")
    (src / "Viral Pneumonia").rename(src / "viral_pneumonia")
    fx.png_gray(src / "stray.png", seed=9)  # no class folder: not imported
    res = import_tree(src, data)
    assert len(res["added"]) == 6
    assert [Path(p).name for p in res["unknown_class"]] == ["stray.png"]
    got = images_in(data)
    for cls, files in real_images.items():
        for f in files:
            assert got[f"{cls}/images/{f.name}"] == f.read_bytes()


def test_zip_import_and_identical_skip(project, tmp_path):
    data = project / "data"
    src = kaggle_source(tmp_path / "dl")
    z = tmp_path / "archive.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    res = import_source(z, data)
    assert len(res["added"]) == 3
    assert res["skipped"] == {"masks/": 1, "Lung_Opacity/": 1, "*.xlsx": 2, "README/licence": 1}
    before = images_in(data)
    again = import_source(z, data)  # the same archive once more: nothing changes
    assert again["added"] == [] and len(again["skipped_identical"]) == 3 and again["conflicts"] == []
    assert images_in(data) == before


def test_identical_bytes_under_another_name_are_skipped(project, tmp_path):
    data = project / "data"
    existing = fx.png_gray(fx.kaggle_dir(data, "Normal") / "Normal-7.png", seed=7)
    src = tmp_path / "flat"
    (src / "Normal").mkdir(parents=True)
    (src / "Normal" / "renamed.png").write_bytes(existing.read_bytes())
    res = import_tree(src, data)
    assert res["added"] == [] and [Path(p).name for p in res["skipped_identical"]] == ["renamed.png"]
    assert list(images_in(data)) == ["Normal/images/Normal-7.png"]


def test_conflicting_name_is_never_overwritten(project, tmp_path):
    data = project / "data"
    existing = fx.png_gray(fx.kaggle_dir(data, "COVID") / "COVID-1.png", seed=1)
    original = existing.read_bytes()
    src = tmp_path / "flat"
    newer = fx.png_gray(src / "COVID" / "COVID-1.png", seed=77)  # same name, other film
    res = import_tree(src, data)
    assert existing.read_bytes() == original
    [c] = res["conflicts"]
    kept = Path(c["kept_as"])
    assert c["existing"] == str(existing) and kept.parent == existing.parent and kept != existing
    assert kept.read_bytes() == newer.read_bytes()
    assert res["added"] == [str(kept)]
    # importing the same source again is a no-op: the kept copy is recognised
    again = import_tree(src, data)
    assert again["added"] == [] and again["conflicts"] == [] and len(again["skipped_identical"]) == 1


def test_only_restricts_the_import(project, tmp_path):
    data = project / "data"
    src = tmp_path / "flat"
    a = fx.png_gray(src / "COVID" / "a.png", seed=1)
    fx.png_gray(src / "COVID" / "b.png", seed=2)
    res = import_tree(src, data, only={a})
    assert [Path(p).name for p in res["added"]] == ["a.png"]
    assert list(images_in(data)) == ["COVID/images/a.png"]


def test_zip_slip_is_refused(project, tmp_path):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../../escape.png", b"x")
    with pytest.raises(ValueError, match="outside"):
        import_source(z, project / "data")
    assert not (tmp_path / "escape.png").exists()


def test_cli_import_with_check_and_next_step(project, tmp_path):
    src = kaggle_source(tmp_path / "dl")
    fx.text_file(src / KAGGLE / "COVID" / "images" / "notes.png")  # rejected by --check
    r = CliRunner().invoke(app, ["data", "import", str(src), "--check"])
    assert r.exit_code == 0, r.output
    assert ("Skipped, not part of this dataset: *.xlsx (2 files), Lung_Opacity/ (1 file), README/licence (1 file), "
            "masks/ (1 file).") in r.output
    assert "Added 3" in r.output and "1 rejected by the check" in r.output
    assert "dvc add data && dvc push" in r.output
    assert "COVID/images/notes.png" not in images_in(project / "data")
