"""DICOM input for `preprocess.open_image`: one DICOM file -> an 8-bit greyscale PIL image.

`preprocess.open_image` sends every DICOM here (`is_dicom`), so serving, `data check`,
`data import` and the training cache all read DICOM through this one function.

What is accepted
----------------
- Detection is by content, never by file name (data/dicomsniff.py): a Part 10 file, or a
  *preamble-less* dataset, which is then read with `force=True` and must still carry an image (Rows, Columns, Pixel
  Data) or it is `not_an_image`. No Pillow format starts with those bytes, so the sniff never
  steals a PNG/JPEG/... from Pillow.
- Modality CR, DX or RG (the projection-radiograph modalities of the standard) and DR (not a
  standard code, but written by some digital radiography systems). Anything else (CT, MR, US,
  MG, OT, SC, ...) or no Modality at all is `dicom_not_radiograph`.
- One frame. NumberOfFrames > 1 is `dicom_multiframe`.
- A frontal view. ViewPosition LL, RL, LAT or LATERAL, or a View Code Sequence meaning
  "(left|right) lateral" (SNOMED 399173006 / 399198007, R-10236 / R-10232), is `dicom_lateral`.
- Pixel data present (`dicom_no_pixels` otherwise); a transfer syntax with an installed decoder
  (native, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 via pydicom and the pylibjpeg
  plugins; `dicom_unsupported` otherwise); decodable data (`corrupt` otherwise).
- MONOCHROME1 / MONOCHROME2 (the only ones the CR/DX IODs allow). RGB / YBR 8-bit data is
  converted to RGB (the colour rule, rules.judge, then judges it); PALETTE COLOR is `dicom_unsupported`.

The pixel pipeline (in this order)
----------------------------------
1. the modality LUT: Modality LUT Sequence, or RescaleSlope / RescaleIntercept
   (`pydicom.pixels.apply_modality_lut`);
2. the VOI LUT Sequence or the first WindowCenter / WindowWidth, if present
   (`pydicom.pixels.apply_voi_lut`, LINEAR / LINEAR_EXACT / SIGMOID);
3. scaling to [0, 1] by the *real* value range, never by 255: after a window, the range the
   window maps onto (what pydicom maps it onto: BitsStored and PixelRepresentation through the
   rescale); after a VOI LUT, the LUT's own output range (min..max of LUT Data: the declared bit
   depth is unreliable in practice); without either, the stored range (BitsStored,
   PixelRepresentation) through the modality LUT;
4. MONOCHROME1 is inverted (its low values are white);
5. rounding to uint8: an `L` image with `format = "DICOM"`, so callers treat it like any other.
   (PresentationLUTShape is not consulted: for CR/DX it must agree with the photometric
   interpretation.)

Privacy
-------
Patient data never reaches a log, a response, a report or an error message:
- only the elements needed above are parsed (`dcmread(specific_tags=...)`): the patient,
  study and equipment modules are never even decoded;
- error messages are written here, from fixed text; the only element values they quote are
  Modality, ViewPosition and the transfer syntax, and only when they match the syntax of those
  elements (code strings / UIDs), so a value with anything else in it is never echoed;
  pydicom's own exception texts are never passed on (they can quote values);
- pydicom's warnings are silenced while reading, and its `pydicom` logger gets a filter that
  replaces every message (they can quote values) with a fixed text;
- `im.info` carries only `dicom_modality`, `dicom_photometric`, `dicom_bits_stored`,
  `dicom_transfer_syntax` and `dicom_voi` (window / lut / none).
"""
from __future__ import annotations

import io
import logging
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image

from covid_cxr.data.dicomsniff import has_preamble, is_raw_dataset
from covid_cxr.data.errors import ImageError

PROJECTION_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
LATERAL_CODES = frozenset({"399173006", "399198007", "R-10236", "R-10232"})  # SNOMED CT / SNOMED-RT
_LATERAL_MEANING = re.compile(r"^\s*((left|right)[\s-]+)?lateral\s*$", re.IGNORECASE)

_CS = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # DICOM code string: nothing else is ever echoed
_UID = re.compile(r"^[0-9.]{1,64}$")
# The elements read (`specific_tags`); group 0028 (Image Pixel, Modality LUT, VOI LUT) is added.
_TAGS = [
    0x00080005,  # SpecificCharacterSet
    0x00080016,  # SOPClassUID
    0x00080060,  # Modality
    0x00185101,  # ViewPosition
    0x00540220,  # ViewCodeSequence
    0x7FE00001,  # ExtendedOffsetTable
    0x7FE00002,  # ExtendedOffsetTableLengths
    0x7FE00008,  # FloatPixelData
    0x7FE00009,  # DoubleFloatPixelData
    0x7FE00010,  # PixelData
]
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

_quiet_installed = False


class _Redact(logging.Filter):
    """pydicom's log lines can quote element values: keep the event, drop the text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "pydicom: message withheld (it may quote DICOM element values)"
        record.args = ()
        return True


def _pydicom():
    global _quiet_installed
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency of the project
        raise ImageError("dicom_unsupported", "DICOM support (pydicom) is not installed") from None
    if not _quiet_installed:
        logging.getLogger("pydicom").addFilter(_Redact())
        _quiet_installed = True
    return pydicom


def _tags() -> list[int]:
    from pydicom.datadict import DicomDictionary

    return sorted(set(_TAGS) | {k for k, v in DicomDictionary.items() if k >> 16 == 0x0028 and v[3] == ""})


# --------------------------------------------------------------------------- safe element access


def _cs(ds, keyword: str) -> str | None:
    """A code-string element's (first) value, upper-cased, only if it is a well-formed code string."""
    try:
        v = ds.get(keyword)
    except Exception:
        return None
    if v is None:
        return None
    if not isinstance(v, str):  # multi-valued
        try:
            v = v[0]
        except Exception:
            return None
    v = str(v).strip().upper()
    return v if v and _CS.match(v) else None


def _int(ds, keyword: str, default: int | None = None) -> int | None:
    try:
        v = ds.get(keyword)
        return default if v is None or v == "" else int(v)
    except Exception:
        return default


def _ts_name(uid) -> str:
    name = getattr(uid, "name", "")
    if name and name != str(uid) and re.match(r"^[\w\s(),.\-\[\]:]{1,100}$", name):
        return f"{name} ({uid})" if _UID.match(str(uid)) else name
    return str(uid) if _UID.match(str(uid)) else "an unknown transfer syntax"


def _is_lateral(ds) -> bool:
    if _cs(ds, "ViewPosition") in LATERAL_VIEWS:
        return True
    try:
        seq = ds.get("ViewCodeSequence") or []
        for item in seq:
            if str(item.get("CodeValue", "")).strip() in LATERAL_CODES:
                return True
            if _LATERAL_MEANING.match(str(item.get("CodeMeaning", ""))):
                return True
    except Exception:
        return False
    return False


# --------------------------------------------------------------------------- value ranges


def _stored_range(ds) -> tuple[float, float]:
    bits = _int(ds, "BitsStored") or _int(ds, "BitsAllocated") or 8
    if _int(ds, "PixelRepresentation", 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _lut_values(item) -> np.ndarray:
    """LUT Data of a Modality / VOI LUT item as numbers (US list or OW bytes)."""
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        return np.frombuffer(data, "<u2")
    return np.asarray(data if isinstance(data, (list, tuple)) else [data], dtype=np.float64)


def _window_range(ds) -> tuple[float, float]:
    """The (y_min, y_max) that `apply_windowing` maps a window onto (as pydicom computes it)."""
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, 2.0**depth - 1
    lo, hi = _stored_range(ds)
    slope, icpt = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and icpt is not None:
        lo, hi = lo * float(slope) + float(icpt), hi * float(slope) + float(icpt)
    return lo, hi


def _modality_range(ds) -> tuple[float, float]:
    """Min and max a stored value can take after the modality LUT."""
    if ds.get("ModalityLUTSequence"):
        v = _lut_values(ds.ModalityLUTSequence[0])
        return float(v.min()), float(v.max())
    lo, hi = _window_range(ds)
    return min(lo, hi), max(lo, hi)


# --------------------------------------------------------------------------- decoding


def _read(data: bytes):
    pydicom = _pydicom()
    preamble = has_preamble(data)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not preamble, specific_tags=_tags())
    except Exception:
        if not preamble:  # it only looked like a raw dataset
            raise ImageError("not_an_image", "not a readable image (not a DICOM dataset)") from None
        raise ImageError("corrupt", "the DICOM file cannot be parsed (truncated or corrupt)") from None
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # A preamble-less dataset without file meta: native pixel data in the encoding it was read with.
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        if implicit is None:
            raise ImageError("not_an_image", "not a readable image (not a DICOM dataset)")
        if meta is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    if len(ds) == 0:  # nothing after the file meta (the elements read are all image-related)
        raise ImageError("corrupt", "the DICOM file is truncated: it holds no dataset")
    if not preamble and not ("Rows" in ds and "Columns" in ds) and not any(t in ds for t in _PIXEL_TAGS):
        raise ImageError("not_an_image", "not a readable image (not a DICOM image)")
    return ds


def _check(ds, max_pixels: int) -> None:
    modality = _cs(ds, "Modality")
    if modality not in PROJECTION_MODALITIES:
        what = f"modality {modality}" if modality else (
            "no Modality element" if "Modality" not in ds else "an unrecognised modality")
        raise ImageError(
            "dicom_not_radiograph",
            f"the DICOM is not a projection radiograph ({what}); only chest X-rays "
            f"({', '.join(sorted(PROJECTION_MODALITIES))}) can be analysed",
        )
    if not any(t in ds for t in _PIXEL_TAGS):
        raise ImageError("dicom_no_pixels", "the DICOM has no pixel data (no image to analyse)")
    if "PixelData" not in ds:
        raise ImageError("dicom_unsupported", "float pixel data is not supported in a radiograph")
    frames = _int(ds, "NumberOfFrames", 1) or 1
    if frames > 1:
        raise ImageError("dicom_multiframe", f"the DICOM holds {frames} frames; send a single-frame radiograph")
    if _is_lateral(ds):
        view = _cs(ds, "ViewPosition")
        raise ImageError(
            "dicom_lateral",
            f"the DICOM is a lateral view{f' (ViewPosition {view})' if view else ''}; "
            "the model reads frontal (PA/AP) chest films only",
        )
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols:
        raise ImageError("corrupt", "the DICOM image has no Rows/Columns")
    if rows * cols > max_pixels:
        raise ImageError(
            "too_large", f"image is {cols}x{rows} = {rows * cols / 1e6:.1f} MP, over the {max_pixels / 1e6:.0f} MP limit"
        )


def _pixels(ds) -> np.ndarray:
    from pydicom.pixels import get_decoder

    ts = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(ts)
    except Exception:
        raise ImageError("dicom_unsupported", f"the DICOM transfer syntax {_ts_name(ts)} is not supported") from None
    if not decoder.is_available:
        raise ImageError("dicom_unsupported", f"no decoder is installed for the DICOM transfer syntax {_ts_name(ts)}")
    try:
        return ds.pixel_array
    except Exception:
        raise ImageError("corrupt", "the DICOM pixel data cannot be decoded (truncated or corrupt)") from None


def _grey(arr: np.ndarray, ds, photometric: str) -> tuple[np.ndarray, str]:
    """Stored values -> [0, 1] floats (modality LUT, VOI, range, MONOCHROME1); and which VOI."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        v = apply_modality_lut(arr, ds)
        voi = "none"
        if ds.get("VOILUTSequence"):
            voi = "lut"
            if not np.issubdtype(v.dtype, np.integer):
                v = np.rint(v).astype(np.int64)  # a VOI LUT indexes integers
            v = apply_voi_lut(v, ds)
            lut = _lut_values(ds.VOILUTSequence[0])
            lo, hi = float(lut.min()), float(lut.max())
        elif ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
            voi = "window"
            v = apply_voi_lut(v, ds)
            lo, hi = _window_range(ds)
        else:
            lo, hi = _modality_range(ds)
    except ImageError:
        raise
    except Exception:
        raise ImageError("corrupt", "the DICOM's rescale, LUT or window values are invalid") from None
    v = np.asarray(v, dtype=np.float32)  # 24-bit mantissa: exact for 16-bit data, half the memory of float64
    if hi == lo:
        t = np.zeros(v.shape, np.float32)
    else:
        t = np.clip((v - np.float32(lo)) * np.float32(1.0 / (hi - lo)), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        t = 1.0 - t
    return t, voi


def open_dicom(data: bytes, max_pixels: int) -> Image.Image:
    """DICOM bytes -> a fully decoded PIL image (`L`, or `RGB` for colour data), or ImageError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warnings can quote element values
        ds = _read(data)
        _check(ds, max_pixels)
        photometric = _cs(ds, "PhotometricInterpretation") or ""
        spp = _int(ds, "SamplesPerPixel", 1)
        if photometric == "PALETTE COLOR" or (spp == 1 and photometric not in ("MONOCHROME1", "MONOCHROME2")):
            raise ImageError(
                "dicom_unsupported",
                f"DICOM photometric interpretation {photometric or '(missing)'} is not supported; "
                "a radiograph is MONOCHROME1 or MONOCHROME2",
            )
        arr = _pixels(ds)
        if arr.ndim == 3 and spp == 3 and arr.shape[-1] == 3:
            if _int(ds, "BitsAllocated", 8) != 8:
                raise ImageError("dicom_unsupported", "colour DICOM with more than 8 bits per sample is not supported")
            im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB")
            voi = "none"
        elif arr.ndim == 2:
            t, voi = _grey(arr, ds, photometric)
            im = Image.fromarray(np.rint(t * np.float32(255.0)).astype(np.uint8), "L")
        else:
            raise ImageError("corrupt", "the DICOM pixel data does not have the shape of one image")
    im.format = "DICOM"
    info: dict[str, Any] = {
        "dicom_modality": _cs(ds, "Modality"),
        "dicom_photometric": photometric,
        "dicom_bits_stored": _int(ds, "BitsStored"),
        "dicom_transfer_syntax": str(ds.file_meta.TransferSyntaxUID) if _UID.match(str(ds.file_meta.TransferSyntaxUID)) else None,
        "dicom_voi": voi,
    }
    im.info = info
    return im
