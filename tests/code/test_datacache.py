"""datacache: decoded pixels are reused only while the data *and* the code that decodes them are unchanged."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import imgfactory as fx  # noqa: E402

from covid_cxr.data import cache as datacache, preprocess  # noqa: E402


@pytest.fixture
def films(tmp_path):
    root = tmp_path / "proj"
    rows = []
    for i in range(3):
        p = fx.png_gray(root / "imgs" / f"f{i}.png", size=96, seed=i)
        rows.append({"path": p.relative_to(root).as_posix(), "sha256": f"sha{i}"})
    return root, pd.DataFrame(rows), tmp_path / "cache"


def _edited_preprocess(tmp_path: Path, monkeypatch, extra: str):
    """A copy of preprocess.py with `extra` appended, imported as its own module."""
    f = tmp_path / "preprocess_edited.py"
    f.write_text(Path(preprocess.__file__).read_text() + "\n\n" + extra)
    # a module of the package, so that its relative imports (`.dicom`) resolve
    spec = importlib.util.spec_from_file_location("covid_cxr.preprocess_edited", f)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return f, mod


def test_cache_is_reused_while_nothing_changes(films):
    root, df, cache = films
    a = datacache.decoded(df, 64, root, cache, workers=1)
    assert not isinstance(a, np.memmap) and a.shape == (3, 64, 64) and a.dtype == np.uint8
    b = datacache.decoded(df, 64, root, cache, workers=1)
    assert isinstance(b, np.memmap) and np.array_equal(a, b)
    assert len(list(cache.glob("decoded_*.npy"))) == 1


def test_editing_preprocessing_invalidates_the_cache(films, tmp_path, monkeypatch):
    root, df, cache = films
    before = np.array(datacache.decoded(df, 64, root, cache, workers=1))
    # preprocess.py changes: load_gray now inverts the film
    f, edited = _edited_preprocess(tmp_path, monkeypatch, "_orig = load_gray\n\n"
                                             "def load_gray(*a, **k):\n    return 255 - _orig(*a, **k)\n")
    monkeypatch.setattr(preprocess, "__file__", str(f))
    monkeypatch.setattr(datacache, "load_gray", edited.load_gray)
    after = datacache.decoded(df, 64, root, cache, workers=1)
    assert not isinstance(after, np.memmap), "stale pixels: the cache ignored the preprocessing change"
    assert np.array_equal(after, 255 - before)
    assert len(list(cache.glob("decoded_*.npy"))) == 2


def test_a_comment_only_edit_of_preprocess_also_changes_the_key(films, tmp_path, monkeypatch):
    """Conservative by design: any byte of preprocess.py counts (a false miss costs one decode)."""
    root, df, _ = films
    k0 = datacache._key(df, 64)
    f, _ = _edited_preprocess(tmp_path, monkeypatch, "# a comment\n")
    monkeypatch.setattr(preprocess, "__file__", str(f))
    assert datacache._key(df, 64) != k0


def test_the_decode_path_and_pillow_version_are_in_the_key(films, monkeypatch):
    root, df, _ = films
    k0 = datacache._key(df, 64)
    assert datacache._key(df, 64) == k0  # stable

    def _decode(args):  # same name, other body
        path, size = args
        return preprocess.load_gray(path, size)[::-1]

    monkeypatch.setattr(datacache, "_decode", _decode)
    k1 = datacache._key(df, 64)
    assert k1 != k0
    import PIL

    monkeypatch.setattr(PIL, "__version__", "0.0.1")
    assert datacache._key(df, 64) != k1


def test_data_and_size_are_in_the_key(films):
    _, df, _ = films
    k0 = datacache._key(df, 64)
    assert datacache._key(df, 128) != k0
    df2 = df.copy()
    df2.loc[0, "sha256"] = "other"
    assert datacache._key(df2, 64) != k0
