"""data import: Kaggle folder, flat folder, zip; skips, identical files, name conflicts."""
from __future__ import annotations

import zipfile
from pathlib import Path

import imgfactory as fx
import pytest
from typer.testing import CliRunner

from covid_cxr.cli import app
from covid_cxr.data.archive import import_source, import_tree

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


# --------------------------------------------------------------------------- zip bombs


def _limits_params(project: Path, **imp) -> None:
    """Smaller zip limits in the project's params.yaml (the real ones need GB-sized archives)."""
    import yaml

    p = yaml.safe_load((project / "params.yaml").read_text())
    p["import"].update(imp)
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def _bomb(path: Path, name: str = "COVID-19_Radiography_Dataset/COVID/images/COVID-9.png", mb: int = 4) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, b"\0" * (mb << 20))
    return path


def _lie_about_size(path: Path, declared: int) -> None:
    """Rewrite the uncompressed size in the local and central headers of a one-member zip."""
    import struct

    b = bytearray(path.read_bytes())
    lh = b.find(b"PK\x03\x04")
    struct.pack_into("<I", b, lh + 22, declared)
    cd = b.find(b"PK\x01\x02")
    struct.pack_into("<I", b, cd + 24, declared)
    path.write_bytes(bytes(b))


def _no_unpack(monkeypatch):
    import covid_cxr.data.archive as di

    def boom(*a, **k):
        raise AssertionError("a member was unpacked although the headers already showed the archive too big")

    monkeypatch.setattr(di, "_unpack_member", boom)


def test_zip_limits_come_from_params_yaml(params):
    from covid_cxr.data.archive import ZipLimits

    lim = ZipLimits.from_params(params)
    imp = params["import"]
    assert lim.max_total_bytes == imp["max_total_mb"] << 20 and lim.max_member_bytes == imp["max_member_mb"] << 20
    assert lim.max_ratio == imp["max_ratio"] and lim.ratio_min_bytes == imp["ratio_min_mb"] << 20
    with pytest.raises(KeyError, match="params.yaml import: lacks max_total_mb"):
        ZipLimits.from_params({"import": {"max_member_mb": 1, "max_ratio": 1, "ratio_min_mb": 1}})


def test_compressible_bomb_is_refused_from_its_headers_with_real_limits(project, tmp_path, monkeypatch):
    """4 MB of zeros squeezed ~1000:1: over the real params.yaml's import.max_ratio, never unpacked."""
    from covid_cxr.data.archive import UnsafeArchive

    z = _bomb(tmp_path / "bomb.zip")
    _no_unpack(monkeypatch)
    with pytest.raises(UnsafeArchive, match=r"^bomb\.zip: member .*COVID-9\.png is compressed [\d,]+:1, over import\.max_ratio"):
        import_source(z, project / "data")
    assert images_in(project / "data") == {}


def test_member_over_max_member_mb_is_refused(project, tmp_path, monkeypatch):
    from covid_cxr.data.archive import UnsafeArchive

    _limits_params(project, max_member_mb=2, max_ratio=10_000)
    z = _bomb(tmp_path / "big.zip", mb=3)
    _no_unpack(monkeypatch)
    with pytest.raises(UnsafeArchive, match=r"would unpack to 3\.0 MB, over import\.max_member_mb \(2\.0 MB\)"):
        import_source(z, project / "data")
    assert images_in(project / "data") == {}


def test_total_over_max_total_mb_is_refused(project, tmp_path, monkeypatch):
    """Incompressible members, each within limits, too big together."""
    import numpy as np

    from covid_cxr.data.archive import UnsafeArchive

    _limits_params(project, max_total_mb=1, max_member_mb=1)
    z = tmp_path / "many.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(3):
            zf.writestr(f"{KAGGLE}/Normal/images/Normal-{i}.png", rng.bytes(400_000))
        zf.writestr(f"{KAGGLE}/Normal/masks/Normal-0.png", rng.bytes(2_000_000))  # skipped: does not count
    _no_unpack(monkeypatch)
    with pytest.raises(UnsafeArchive, match=r"would unpack to more than 1\.0 MB \(import\.max_total_mb\)"):
        import_source(z, project / "data")
    assert images_in(project / "data") == {}


def test_masks_do_not_count_towards_the_limits(project, tmp_path):
    _limits_params(project, max_total_mb=1)
    src = kaggle_source(tmp_path / "dl")
    z = tmp_path / "ok.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
        zf.writestr(f"{KAGGLE}/COVID/masks/huge.png", b"\0" * (8 << 20))  # never unpacked
    res = import_source(z, project / "data")
    assert len(res["added"]) == 3 and res["skipped"]["masks/"] == 2


def test_header_that_understates_the_size_is_caught_while_unpacking(project, tmp_path):
    """The headers say 1,000 bytes (so every header check passes); the stream holds 4 MB."""
    from covid_cxr.data.archive import UnsafeArchive

    z = _bomb(tmp_path / "liar.zip")
    _lie_about_size(z, 1000)
    with zipfile.ZipFile(z) as zf:
        assert zf.infolist()[0].file_size == 1000
    with pytest.raises(UnsafeArchive, match=r"^liar\.zip: member .*COVID-9\.png is corrupt .*refusing the archive"):
        import_source(z, project / "data")
    assert images_in(project / "data") == {}


def test_stream_longer_than_its_header_is_cut_off(project, tmp_path, monkeypatch):
    """Defence in depth: even if the decompressor yielded more than the header declares, the
    unpacking stops within one chunk of the declared size."""
    import covid_cxr.data.archive as di

    z = tmp_path / "small.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{KAGGLE}/COVID/images/COVID-1.png", b"\0" * 5000)

    class Endless:
        read_total = 0

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self, n=-1):
            Endless.read_total += n
            assert Endless.read_total < 100 * di.CHUNK, "unbounded read"
            return b"\0" * n

    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, m, *a, **k: Endless())
    written = []
    real = di._unpack_member

    def spy(zf, m, dst, limits, done):
        try:
            return real(zf, m, dst, limits, done)
        finally:
            written.append(dst.stat().st_size if dst.exists() else 0)

    monkeypatch.setattr(di, "_unpack_member", spy)
    with pytest.raises(di.UnsafeArchive, match=r"unpacks to more than the 5,000 bytes its header declares"):
        import_source(z, project / "data")
    assert written == [0] and Endless.read_total <= di.CHUNK  # the first chunk overshoots: nothing written
    assert images_in(project / "data") == {}


def test_cli_refuses_a_bomb_in_one_line(project, tmp_path):
    z = _bomb(tmp_path / "bomb.zip")
    r = CliRunner().invoke(app, ["data", "import", str(z)])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.strip().splitlines() if not ln.startswith("⏱")]  # the wall time of the run
    assert len(lines) == 1 and lines[0].startswith("error: bomb.zip: member ") and "zip bomb?" in lines[0], r.output
    assert images_in(project / "data") == {}
