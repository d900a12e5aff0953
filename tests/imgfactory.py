"""Small, deterministic good and bad image files for tests (shared by data and service tests).

Every function writes one file and returns its Path. Good images look a little like a chest
film (bright frame, two darker lung fields, rib stripes, seed-dependent texture), so they pass
every rejection rule (`rules.judge`), and two different seeds are never near-duplicates of each other.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# The team's shared folder: $COVID_CXR_SHARED, else beside the checkout (the rule of tests/conftest.py;
# recomputed here because `from conftest import ...` can pick up a sub-folder's conftest module).
SHARED = Path(os.environ.get("COVID_CXR_SHARED", Path(__file__).resolve().parents[1].parent / "shared")).resolve()
BATCH_001 = SHARED / "incoming" / "batch-001"
KAGGLE = "COVID-19_Radiography_Dataset"


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def xray_array(size: int | tuple[int, int] = 256, seed: int = 0) -> np.ndarray:
    """A (h, w) float array in [0, 1] that looks vaguely like a frontal chest film."""
    w, h = _size(size)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y /= max(h - 1, 1)
    x /= max(w - 1, 1)
    img = 0.75 - 0.25 * (2 * x - 1) ** 2
    for cx in (0.3, 0.7):  # lung fields
        img -= 0.35 * np.exp(-(((x - cx) / 0.14) ** 2 + ((y - 0.45) / 0.25) ** 2))
    img += 0.05 * np.sin(2 * np.pi * (y * rng.uniform(7, 11) + rng.uniform(0, 1)))  # ribs
    coarse = rng.standard_normal((24, 24)).astype(np.float32)  # seed-specific mid-scale texture
    tex = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    img += 0.06 * tex + 0.01 * rng.standard_normal((h, w))
    return np.clip(img, 0, 1)


def gray_array(size: int | tuple[int, int] = 256, seed: int = 0) -> np.ndarray:
    return (xray_array(size, seed) * 255 + 0.5).astype(np.uint8)


def png_gray(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0) -> Path:
    """A valid 8-bit greyscale PNG (mode L)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray_array(size, seed)).save(path, "PNG")
    return path


def png16(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0) -> Path:
    """A valid 16-bit greyscale PNG X-ray (Pillow mode I;16), 12-bit range like a DICOM export."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (xray_array(size, seed) * 4095).astype(np.uint16)
    Image.fromarray(a).save(path, "PNG")
    return path


def jpeg_gray_rgb(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0, quality: int = 90) -> Path:
    """A greyscale film saved as an *RGB* JPEG (valid: an X-ray, not a colour picture)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray_array(size, seed)).convert("RGB").save(path, "JPEG", quality=quality)
    return path


def rgb_photo(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0) -> Path:
    """A colourful RGB picture (sky, grass, a red blob): plainly not an X-ray."""
    w, h = _size(size)
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None] * np.ones((1, w))
    a = np.zeros((h, w, 3), np.float32)
    a[..., 0] = 60 + 40 * y
    a[..., 1] = 140 + 60 * (y > 0.6)
    a[..., 2] = 230 * (y <= 0.6) + 40
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((xx - w * 0.6) ** 2 + (yy - h * 0.4) ** 2) < (min(w, h) * 0.15) ** 2
    a[blob] = (220, 30, 30)
    a += rng.normal(0, 4, a.shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB").save(path, "PNG")
    return path


def blank(path: Path | str, size: int | tuple[int, int] = 256, value: int = 128) -> Path:
    """A constant grey PNG: decodes fine, but is not an X-ray."""
    w, h = _size(size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (w, h), value).save(path, "PNG")
    return path


def la_png(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0) -> Path:
    """A greyscale+alpha PNG (mode LA): an X-ray, but a pixel mode outside validate.modes."""
    g = Image.fromarray(gray_array(size, seed))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.merge("LA", (g, Image.new("L", g.size, 255))).save(path, "PNG")
    return path


def truncated(path: Path | str, size: int | tuple[int, int] = 256, seed: int = 0, keep: float = 0.5) -> Path:
    """A PNG cut off part-way through its pixel data (the header still reads)."""
    buf = io.BytesIO()
    Image.fromarray(gray_array(size, seed)).save(buf, "PNG")
    data = buf.getvalue()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: max(64, int(len(data) * keep))])
    return path


def zero_bytes(path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def text_file(path: Path | str, text: str = "patient notes: not an image\n") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def tiny(path: Path | str, size: int = 32, seed: int = 0) -> Path:
    """A valid greyscale PNG under the 64 px minimum side."""
    return png_gray(path, size, seed)


def wide(path: Path | str, width: int = 4200, height: int = 96, seed: int = 0) -> Path:
    """A valid PNG over the 4096 px maximum on one side, yet small in pixels (decodes cheaply)."""
    return png_gray(path, (width, height), seed)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_dims(path: Path | str, width: int = 30000, height: int = 30000) -> Path:
    """A PNG whose header claims width x height (default 900 MP) over a few bytes of pixel data.

    Costs no memory to write; a safe decoder must refuse it from the header alone.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 1024)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def animated_gif(path: Path | str, size: int = 128, frames: int = 3) -> Path:
    ims = [Image.fromarray(gray_array(size, s)) for s in range(frames)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ims[0].save(path, "GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)
    return path


def tga(path: Path | str, size: int = 128, seed: int = 0) -> Path:
    """A valid image in a format the project does not accept (Targa)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray_array(size, seed)).save(path, "TGA")
    return path


def resaved(src: Path | str, path: Path | str, size: int = 299, fmt: str = "PNG") -> Path:
    """The same film re-exported at another size / format: a near-duplicate of `src`."""
    im = Image.open(src)
    im.load()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.resize((size, size), Image.Resampling.BILINEAR).save(path, fmt)
    return path


def recropped(
    src: Path | str, path: Path | str, crop: tuple[float, float, float, float] = (0.06, 0.03, 0.02, 0.10),
    size: int | None = None,
) -> Path:
    """The same film re-cropped: `crop` = the fraction cut off the (left, top, right, bottom) edge,
    then resized back to the original size (or `size`), as a re-published copy of a scan is."""
    im = Image.open(src)
    im.load()
    w, h = im.size
    l, t, r, b = crop
    box = (round(l * w), round(t * h), round(w - r * w), round(h - b * h))
    out = im.crop(box).resize((size, size) if size else (w, h), Image.Resampling.BICUBIC)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, "PNG")
    return path


def real_images(n_per_class: int = 2) -> dict[str, list[Path]]:
    """Up to n real batch-001 files per class folder (empty dict when the share is absent)."""
    out: dict[str, list[Path]] = {}
    if not BATCH_001.is_dir():
        return out
    for d in sorted(p for p in BATCH_001.iterdir() if p.is_dir()):
        out[d.name] = sorted(d.glob("*.png"))[:n_per_class]
    return out


def kaggle_dir(data: Path, cls: str) -> Path:
    """`data/COVID-19_Radiography_Dataset/<cls>/images/`, created."""
    d = Path(data) / KAGGLE / cls / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def copy_real(real: dict[str, list[Path]], dst: Path | str, per_class: int = 1, layout: str = "flat") -> list[Path]:
    """Copy real files into dst as `<Class>/<file>` (flat) or the Kaggle layout."""
    out = []
    for cls, files in real.items():
        d = Path(dst) / cls if layout == "flat" else kaggle_dir(dst, cls)
        d.mkdir(parents=True, exist_ok=True)
        out += [Path(shutil.copy2(f, d / f.name)) for f in files[:per_class]]
    return out


# --------------------------------------------------------------------------- DICOM
# DICOM files are built here from a greyscale array (usually a real batch-001 PNG), so no binary
# fixture is committed. `dicom_bytes` stores `gray` so that a correct reader gives `gray` back:
# the stored values, rescale, window and photometric interpretation are chosen to undo each other.

FAKE_PATIENT_NAME = "Doe^Jane^Testpatient"
FAKE_PATIENT_ID = "PID-4242-TESTONLY"


def _jpeg_lossless(arr: np.ndarray, precision: int) -> bytes:
    """A JPEG lossless (process 14, first-order prediction, SV1) codestream of a 2-D array.

    pydicom 3 has no encoder for it; this one is just enough for tests: one Huffman table with
    every difference category (0..16) coded in 5 bits.
    """
    h, w = arr.shape
    x = arr.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]   # first row: left neighbour
    pred[1:, 0] = x[:-1, 0]   # first column: the pixel above
    pred[1:, 1:] = x[1:, :-1]  # SV1: left neighbour
    d = (x - pred).ravel() % 65536
    d = np.where(d > 32768, d - 65536, d)  # -32767..32768
    mag = np.abs(d)
    ssss = np.zeros_like(mag)
    nz = mag > 0
    ssss[nz] = np.floor(np.log2(mag[nz])).astype(np.int64) + 1
    extra = np.where(d >= 0, d, d - 1) & ((1 << ssss) - 1)
    extra = np.where(ssss == 16, 0, extra)
    nextra = np.where(ssss == 16, 0, ssss)
    value = (ssss << nextra) | extra  # the 5-bit code of category s is s itself
    nbits = 5 + nextra
    j = np.arange(21)
    bits = (value[:, None] >> (nbits[:, None] - 1 - j[None, :])) & 1
    stream = bits[j[None, :] < nbits[:, None]].astype(np.uint8)
    stream = np.concatenate([stream, np.ones((-len(stream)) % 8, np.uint8)])  # pad with 1 bits
    body = np.packbits(stream).tobytes().replace(b"\xff", b"\xff\x00")
    counts = bytes([0, 0, 0, 0, 17] + [0] * 11)
    dht = b"\xff\xc4" + struct.pack(">H", 2 + 1 + 16 + 17) + b"\x00" + counts + bytes(range(17))
    sof = b"\xff\xc3" + struct.pack(">HBHHB", 11, precision, h, w, 1) + b"\x01\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00" + bytes([1, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + body + b"\xff\xd9"


DICOM_VARIANTS = (
    "mono2_8", "mono1_8", "rescale_12", "rescale_16", "signed_16_mono1", "window_12", "voilut_12",
    "implicit_no_preamble", "rle_12_mono1", "j2k_lossless_16", "j2k_lossy_12", "jpeg_baseline_8",
    "jpeg_lossless_12",
)


def dicom_bytes(
    gray: np.ndarray,
    variant: str = "mono2_8",
    *,
    modality: str = "DX",
    view: str | None = "PA",
    frames: int = 1,
    pixels: bool = True,
    patient_name: str = FAKE_PATIENT_NAME,
    patient_id: str = FAKE_PATIENT_ID,
) -> bytes:
    """A single-frame DICOM of `gray` (2-D uint8) in one of DICOM_VARIANTS (see the comments)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about deliberately odd values (a test's point)
        return _dicom_bytes(gray, variant, modality=modality, view=view, frames=frames, pixels=pixels,
                            patient_name=patient_name, patient_id=patient_id)


def _dicom_bytes(gray, variant, *, modality, view, frames, pixels, patient_name, patient_id) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000,
        JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, RLELossless, generate_uid,
    )

    g = np.asarray(gray, dtype=np.float64)
    photometric, bits, signed = "MONOCHROME2", 8, False
    extra: dict[str, Any] = {}
    if variant in ("mono2_8", "implicit_no_preamble", "jpeg_baseline_8"):
        stored = g
    elif variant == "mono1_8":
        stored, photometric = 255 - g, "MONOCHROME1"
    elif variant in ("rescale_12", "rle_12_mono1", "jpeg_lossless_12", "j2k_lossy_12"):
        bits = 12
        stored = np.rint(g * 4095 / 255)
        extra = {"RescaleSlope": 2, "RescaleIntercept": -1024, "RescaleType": "US"}
        if variant == "rle_12_mono1":
            stored, photometric = 4095 - stored, "MONOCHROME1"
    elif variant in ("rescale_16", "j2k_lossless_16"):
        bits = 16
        stored = np.rint(g * 65535 / 255)
        extra = {"RescaleSlope": 0.5, "RescaleIntercept": -8192, "RescaleType": "US"}
    elif variant == "signed_16_mono1":  # PixelRepresentation 1, MONOCHROME1, identity rescale
        bits, signed, photometric = 16, True, "MONOCHROME1"
        stored = 32767 - np.rint(g * 65535 / 255)
        extra = {"RescaleSlope": 1, "RescaleIntercept": 0}
    elif variant == "window_12":
        # The film uses stored values 1000..3040 of 0..4095; the window maps exactly that onto the
        # full output: a reader that ignored the window would show a dim, grey film.
        bits = 12
        stored = 1000 + 8 * g
        extra = {"WindowCenter": 2020.5, "WindowWidth": 2041, "VOILUTFunction": "LINEAR"}
    elif variant == "voilut_12":
        # Stored values are a gamma curve of the film; the VOI LUT undoes it.
        bits = 12
        stored = np.rint(4095 * (g / 255) ** 2)
        s = np.arange(4096)
        lut = np.rint(4095 * np.sqrt(s / 4095)).astype(int)
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 12]
        item.LUTData = [int(v) for v in lut]
        item["LUTData"].VR = "US"
        extra = {"VOILUTSequence": [item]}
    else:
        raise ValueError(f"unknown DICOM variant {variant!r}")

    dtype = (np.int16 if signed else np.uint16) if bits > 8 else np.uint8
    arr = np.ascontiguousarray(stored.astype(dtype))
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC-TESTONLY-1"
    ds.InstitutionName = "Test General Hospital"
    ds.StudyDescription = f"CHEST {patient_name}"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    if view is not None:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    for k, v in extra.items():
        setattr(ds, k, v)
    if frames > 1:
        ds.NumberOfFrames = frames
        arr = np.ascontiguousarray(np.stack([arr] * frames))
    ts = ImplicitVRLittleEndian if variant == "implicit_no_preamble" else ExplicitVRLittleEndian
    if pixels:
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    if pixels and variant == "rle_12_mono1":
        ds.compress(RLELossless, generate_instance_uid=False)
    elif pixels and variant == "j2k_lossless_16":
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    elif pixels and variant == "j2k_lossy_12":
        ds.compress(JPEG2000, j2k_cr=[8], generate_instance_uid=False)
    elif pixels and variant == "jpeg_baseline_8":
        buf = io.BytesIO()
        Image.fromarray(arr, "L").save(buf, "JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = "01"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    elif pixels and variant == "jpeg_lossless_12":
        ds.PixelData = encapsulate([_jpeg_lossless(arr, bits)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    buf = io.BytesIO()
    if variant == "implicit_no_preamble":  # a bare dataset: no preamble, no DICM, no file meta
        del ds.file_meta
        ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_file(path: Path | str, gray: np.ndarray, variant: str = "mono2_8", **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dicom_bytes(gray, variant, **kw))
    return path
