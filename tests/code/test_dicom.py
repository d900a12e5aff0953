"""DICOM input through preprocess (the one decode path): pixels, rejections, privacy, the model.

Every DICOM is built here from a real batch-001 PNG (tests/imgfactory.py `dicom_bytes`), in
each encoding a hospital may send; each must decode to the PNG's pixels, and through a small
real model give the PNG's label with probabilities within 0.02.
"""
from __future__ import annotations

import io
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "service"))
import imgfactory as fx  # noqa: E402

from covid_cxr.data import dicom, dicomsniff  # noqa: E402
from covid_cxr.config import CLASSES  # noqa: E402
from covid_cxr.data.preprocess import ImageError, load_gray, open_image, to_gray  # noqa: E402

SIZE = 224
LOSSY = {"jpeg_baseline_8": 1.0, "j2k_lossy_12": 1.0}  # mean |difference| allowed at 224 px
SECRETS = (fx.FAKE_PATIENT_NAME, fx.FAKE_PATIENT_ID, "Doe", "Testpatient", "PID-4242", "19700101",
           "ACC-TESTONLY", "Test General Hospital")


@pytest.fixture(scope="module")
def pngs() -> list[Path]:
    """One real X-ray per class."""
    real = fx.real_images(1)
    if not real:
        pytest.skip(f"{fx.BATCH_001} is not available (set COVID_CXR_SHARED)")
    return [files[0] for files in real.values()]


@pytest.fixture(scope="module")
def gray(pngs) -> np.ndarray:
    return np.asarray(Image.open(pngs[0]).convert("L"))


def assert_private(text: str) -> None:
    for s in SECRETS:
        assert s.lower() not in text.lower(), f"{s!r} leaked into: {text[:300]}"


# --------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("variant", fx.DICOM_VARIANTS)
def test_every_variant_decodes_to_the_png_it_was_made_from(pngs, variant):
    for png in pngs:
        g = np.asarray(Image.open(png).convert("L"))
        data = fx.dicom_bytes(g, variant)
        im = open_image(data)
        assert im.format == "DICOM" and im.mode == "L" and im.size == g.shape[::-1]
        full = np.abs(to_gray(im).astype(int) - g)
        mad = np.abs(load_gray(data, SIZE).astype(int) - load_gray(png, SIZE).astype(int)).mean()
        if variant in LOSSY:
            assert mad <= LOSSY[variant], (variant, png.name, mad)
        elif variant == "voilut_12":  # the gamma LUT round-trips through 12-bit integers
            assert full.max() <= 2 and mad <= 0.1, (variant, png.name, full.max(), mad)
        else:
            assert full.max() == 0, (variant, png.name, full.max())


def test_window_and_monochrome1_are_applied_not_ignored(gray):
    """The window variant stores the film in 1000..3040 of 12 bits: without the window it is dim."""
    im = open_image(fx.dicom_bytes(gray, "window_12"))
    assert im.info["dicom_voi"] == "window"
    naive = (1000 + 8 * gray.astype(float)) / 4095 * 255  # scaled by BitsStored, window ignored
    assert np.abs(naive - gray).mean() > 20
    assert np.array_equal(np.asarray(im), gray)
    m1 = open_image(fx.dicom_bytes(gray, "mono1_8"))
    assert m1.info["dicom_photometric"] == "MONOCHROME1" and np.array_equal(np.asarray(m1), gray)


def test_info_carries_only_safe_fields(gray):
    im = open_image(fx.dicom_bytes(gray, "rle_12_mono1"))
    assert set(im.info) == {"dicom_modality", "dicom_photometric", "dicom_bits_stored", "dicom_transfer_syntax",
                            "dicom_voi"}
    assert im.info["dicom_modality"] == "DX" and im.info["dicom_bits_stored"] == 12
    assert im.info["dicom_transfer_syntax"] == "1.2.840.10008.1.2.5"
    assert_private(repr(im.info))


def test_dicom_is_detected_by_content_not_name(tmp_path, gray):
    p = fx.dicom_file(tmp_path / "scan.png", gray, "mono2_8")  # misnamed: still read as DICOM
    assert open_image(p).format == "DICOM"
    raw = fx.dicom_bytes(gray, "implicit_no_preamble")
    assert raw[128:132] != b"DICM" and dicomsniff.is_dicom(raw)
    assert np.array_equal(np.asarray(open_image(raw)), gray)
    # Pillow formats are never taken for DICOM
    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM", "GIF"):
        b = io.BytesIO()
        Image.fromarray(gray).save(b, fmt)
        assert not dicomsniff.is_dicom(b.getvalue()), fmt
        assert open_image(b.getvalue()).format != "DICOM"


def test_projection_modalities_are_accepted(gray):
    for m in ("CR", "DX", "DR", "RG"):
        assert open_image(fx.dicom_bytes(gray, modality=m)).info["dicom_modality"] == m
    for v in ("PA", "AP", None):
        assert open_image(fx.dicom_bytes(gray, view=v)).format == "DICOM"


# --------------------------------------------------------------------------- rejections


def _reject(data: bytes) -> ImageError:
    with pytest.raises(ImageError) as e:
        open_image(data)
    assert_private(e.value.message)
    assert_private(str(e.value))
    assert e.value.__cause__ is None  # no pydicom exception (its text may quote values) chained on
    assert e.value.__context__ is None or e.value.__suppress_context__
    return e.value


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "MG", "OT", "NM"])
def test_non_radiograph_modalities_are_refused(gray, modality):
    e = _reject(fx.dicom_bytes(gray, modality=modality))
    assert e.code == "dicom_not_radiograph" and f"modality {modality}" in e.message


def test_a_malformed_modality_is_never_echoed(gray):
    e = _reject(fx.dicom_bytes(gray, modality="Doe^Jane"))
    assert e.code == "dicom_not_radiograph" and "unrecognised modality" in e.message


@pytest.mark.parametrize("view", ["LL", "RL", "LAT", "LATERAL"])
def test_lateral_views_are_refused(gray, view):
    e = _reject(fx.dicom_bytes(gray, view=view))
    assert e.code == "dicom_lateral" and "lateral" in e.message and view in e.message


def test_lateral_by_view_code_sequence(gray):
    from pydicom import dcmread
    from pydicom.dataset import Dataset

    ds = dcmread(io.BytesIO(fx.dicom_bytes(gray, view=None)))
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "399173006", "SCT", "left lateral"
    ds.ViewCodeSequence = [item]
    b = io.BytesIO()
    ds.save_as(b)
    assert _reject(b.getvalue()).code == "dicom_lateral"


def test_multiframe_is_refused(gray):
    e = _reject(fx.dicom_bytes(gray[:64, :64], frames=3))
    assert e.code == "dicom_multiframe" and "3 frames" in e.message


def test_no_pixel_data_is_refused(gray):
    e = _reject(fx.dicom_bytes(gray, pixels=False))
    assert e.code == "dicom_no_pixels" and "no pixel data" in e.message


def test_truncated_and_unsupported(gray):
    data = fx.dicom_bytes(gray, "rescale_12")
    assert _reject(data[: len(data) // 2]).code == "corrupt"
    assert _reject(data[:140]).code == "corrupt"
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"  # a private, unknown transfer syntax
    b = io.BytesIO()
    ds.save_as(b)
    e = _reject(b.getvalue())
    assert e.code in {"dicom_unsupported", "corrupt"}
    # a colour palette is not a radiograph
    ds = dcmread(io.BytesIO(fx.dicom_bytes(gray)))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    b = io.BytesIO()
    ds.save_as(b)
    assert _reject(b.getvalue()).code == "dicom_unsupported"


def test_oversized_dicom_is_refused_before_decoding(gray):
    with pytest.raises(ImageError) as e:
        open_image(fx.dicom_bytes(gray, "mono2_8"), max_pixels=100 * 100)
    assert e.value.code == "too_large"


def test_service_maps_dicom_codes_to_422():
    """The service maps unknown ImageError codes to 422; none of ours is in its table."""
    from covid_cxr.serve.guard import STATUS

    for code in ("dicom_not_radiograph", "dicom_lateral", "dicom_multiframe", "dicom_no_pixels",
                 "dicom_unsupported", "corrupt"):
        assert STATUS.get(code, 422) == 422


# --------------------------------------------------------------------------- privacy


def test_patient_fields_reach_no_message_log_or_warning(gray, caplog):
    """Every way a DICOM can be refused, with a patient name and id in it: none leak."""
    from pydicom import dcmread

    bad = [fx.dicom_bytes(gray, modality="CT"), fx.dicom_bytes(gray, view="LL"),
           fx.dicom_bytes(gray[:64, :64], frames=2), fx.dicom_bytes(gray, pixels=False),
           fx.dicom_bytes(gray, modality=fx.FAKE_PATIENT_NAME)]
    data = fx.dicom_bytes(gray, "rescale_12")
    bad += [data[: len(data) - 1000], data[:400]]
    ds = dcmread(io.BytesIO(data))
    ds.WindowCenter, ds.WindowWidth = 100, 0  # invalid window (width < 1)
    b = io.BytesIO()
    ds.save_as(b)
    bad.append(b.getvalue())
    ds = dcmread(io.BytesIO(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PatientName = "Doe^Jane^Testpatient" + "\\bad" * 3  # values pydicom warns about on reading
        ds.PatientBirthDate = "not-a-date-Testpatient"
        ds.Modality = "DX\\Testpatient"  # a second value: only the first is read, and never echoed
    b = io.BytesIO()
    ds.save_as(b)
    good = b.getvalue()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for d in bad:
            _reject(d)
        im = open_image(good)
        odd_view = open_image(fx.dicom_bytes(gray, view=fx.FAKE_PATIENT_ID))  # not lateral: accepted
    assert_private(repr(im.info) + repr(odd_view.info))
    assert_private("\n".join(str(w.message) for w in caught))
    assert_private(caplog.text)


# --------------------------------------------------------------------------- through a model


def _model(tmp_path_factory, size: int, n_per_class: int):
    """A small real model built the way tests/service/svcmodel.py builds the service's."""
    import svcmodel

    from covid_cxr.model.checkpoint import load_model

    try:
        d = svcmodel.build_test_model(tmp_path_factory.mktemp("dicom-model") / "m", image_size=size,
                                      n_per_class=n_per_class)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_model(d)


def _same_prediction(model, pngs) -> dict[str, tuple[float, float]]:
    """Same label and |p_dicom - p_png| <= 0.02 (every class) for every variant and every class's film.

    Returns {variant: (mean |grey difference| at the model's size, max |dp|)}.
    """
    grays_png = np.stack([load_gray(p, model.size) for p in pngs])
    ref = model.predict(grays_png).probs
    variants = list(fx.DICOM_VARIANTS)
    x = np.stack([load_gray(fx.dicom_bytes(np.asarray(Image.open(p).convert("L")), v), model.size)
                  for v in variants for p in pngs])
    probs = model.predict(x).probs.reshape(len(variants), len(pngs), len(CLASSES))
    xs = x.reshape(len(variants), len(pngs), *x.shape[1:]).astype(int)
    measured = {}
    for k, v in enumerate(variants):
        dp = float(np.abs(probs[k] - ref).max())
        measured[v] = (float(np.abs(xs[k] - grays_png.astype(int)).mean()), dp)
        assert (probs[k].argmax(1) == ref.argmax(1)).all(), (v, probs[k], ref)
        assert dp <= 0.02, (v, dp)
    print(f"\nvariant                MAD@{model.size}  max|dp|")  # for the record: pytest -s
    for v, (mad, dp) in measured.items():
        print(f"{v:22s} {mad:7.3f}  {dp:.5f}")
    return measured


def test_each_dicom_gets_the_png_label_and_probabilities(tmp_path_factory, pngs):
    """At the service tests' model size (96 px): seconds."""
    _same_prediction(_model(tmp_path_factory, 96, 4), pngs)


@pytest.mark.slow
def test_each_dicom_gets_the_png_label_and_probabilities_at_224(tmp_path_factory, pngs):
    """The production input size, with the model fitted on more films."""
    _same_prediction(_model(tmp_path_factory, 224, 12), pngs)
