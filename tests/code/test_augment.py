"""Acquisition-style augmentation: every op changes the film, keeps its shape and dtype, and obeys params."""
import numpy as np
import pytest
import yaml

from covid_cxr.model.augment import OPS, Acquisition
from covid_cxr.data.preprocess import load_gray

from conftest import REPO


@pytest.fixture(scope="module")
def film(shared_dir):
    return load_gray(sorted((shared_dir / "incoming" / "batch-001" / "Normal").glob("*.png"))[0], 128)


@pytest.fixture(scope="module")
def cfg():
    return yaml.safe_load((REPO / "params.yaml").read_text())["train"]["augment"]["acquisition"]


def test_params_name_every_op_and_only_known_ones(cfg):
    assert set(cfg) == set(OPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_changes_the_film_and_keeps_shape(name, film, cfg):
    spec = dict(cfg[name], p=1.0)
    out = Acquisition({name: spec})(film, np.random.default_rng(0))
    assert out.shape == film.shape and out.dtype == np.uint8
    assert out.flags.writeable
    assert np.abs(out.astype(int) - film).mean() > 0.05, f"{name} left the film unchanged"


def test_ops_are_reproducible_per_seed_and_vary_across_seeds(film, cfg):
    on = {k: dict(v, p=0.5) for k, v in cfg.items()}
    a = Acquisition(on)
    x1, x2 = a(film, np.random.default_rng(7)), a(film, np.random.default_rng(7))
    np.testing.assert_array_equal(x1, x2)
    others = [a(film, np.random.default_rng(s)) for s in range(8)]
    assert len({o.tobytes() for o in others}) > 4


def test_p_zero_switches_everything_off(film, cfg):
    off = Acquisition({k: dict(v, p=0.0) for k, v in cfg.items()})
    assert not off
    np.testing.assert_array_equal(off(film, np.random.default_rng(0)), film)


def test_unknown_op_is_an_error():
    with pytest.raises(ValueError, match="unknown acquisition ops"):
        Acquisition({"sepia": {"p": 1.0}})


def test_gamma_and_jpeg_move_the_histogram_and_the_detail(film, cfg):
    g = Acquisition({"gamma": {"p": 1.0, "range": [1.6, 1.6]}})(film, np.random.default_rng(0))
    assert g.mean() < film.mean() - 5  # gamma > 1 darkens the mid-tones
    j = Acquisition({"jpeg": {"p": 1.0, "quality": [30, 30]}})(film, np.random.default_rng(0))
    lap = lambda x: np.abs(np.diff(x.astype(int), 2, axis=1)).mean()  # noqa: E731
    assert lap(j) != pytest.approx(lap(film), rel=1e-3)
