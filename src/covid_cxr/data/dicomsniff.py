"""Is this DICOM? By content, never by name, without pydicom: the check every file goes through.

`preprocess.open_image` asks `is_dicom` of every file's bytes and imports the decoder
(data/dicom.py, pydicom) only for those that are, so a PNG-only path never loads it.
- a Part 10 file has `DICM` at byte 128 (`has_preamble`);
- a preamble-less dataset (older PACS exports, `dcmwrite(enforce_file_format=False)`) starts with a
  group 0002 or 0008 element followed by a plausible VR or length (`is_raw_dataset`). No Pillow
  format starts with those bytes, so the sniff never steals a PNG/JPEG/... from Pillow.
"""
from __future__ import annotations

# Explicit VRs a preamble-less dataset's first element may carry.
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD",
        b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
        b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}


def has_preamble(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then `DICM`."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def is_raw_dataset(data: bytes) -> bool:
    """A preamble-less DICOM dataset: starts with a group 0002/0008 element (either byte order),
    followed by an explicit VR or a plausible implicit-VR length."""
    if len(data) < 12 or data[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return False
    if data[4:6] in _VRS:
        return True
    n = int.from_bytes(data[4:8], "little" if data[0] else "big")
    return n < min(len(data), 1 << 16) and int.from_bytes(data[2:4], "little" if data[0] else "big") < 0x2000


def is_dicom(data: bytes) -> bool:
    return has_preamble(data) or is_raw_dataset(data)
