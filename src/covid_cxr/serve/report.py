"""The downloadable analysis report: one A4 page (PDF or PNG) of one film's result.

`build_report(...) -> bytes` is a pure function of its inputs (the service's `/report` calls it;
so can anything else): the title, the film, the Grad-CAM heat map, the confidence table, the
answer, the model and data versions, the date and the not-for-diagnostic-use note.

The answer follows verdict.py: with `ok` the report leads with "Predicted label: <class>";
with `refer` it leads with "Refer: <message>", and the label appears only as the most probable
class, not an answer.

Only pixels go in: no file name and nothing of a DICOM header (the film is identified by the
sha256 of the uploaded bytes). Drawn with matplotlib's object API (no pyplot, no global figure
state) and its bundled DejaVu fonts; fonts are embedded as TrueType so the PDF's text can be
searched and extracted.
"""
from __future__ import annotations

import io
import textwrap
import threading
from datetime import datetime, timezone
from typing import Any, Mapping

import numpy as np

from covid_cxr.config import CLASSES

MEDIA_TYPES = {"pdf": "application/pdf", "png": "image/png"}
TITLE = "Chest X-ray analysis report"
DISCLAIMER = ("Research prototype. Not a medical device and not for diagnostic use: "
              "a clinician must read every image.")
A4 = (8.27, 11.69)        # inches, portrait
PNG_DPI = 110

_INK, _MUTED = "#1b1f24", "#57606a"
_OK_FACE, _OK_EDGE, _OK_INK = "#ddf4ff", "#54aeff", "#0a3069"
_REFER_FACE, _REFER_EDGE, _REFER_INK = "#fff1e5", "#d1242f", "#82071e"
_lock = threading.Lock()  # rc_context touches matplotlib's global rcParams


def _answer_lines(result: Mapping[str, Any]) -> tuple[str, list[str], bool]:
    """-> (the lead line, the lines under it, refer?)."""
    label = result["label"]
    if result.get("verdict") == "refer":
        msg = result.get("message") or "the model cannot judge this film"
        return (f"Refer: {msg}.",
                [f"Most probable class, not an answer: {label}.",
                 "Do not use the scores below as a finding. A clinician must read this film."], True)
    return f"Predicted label: {label}", [], False


def build_report(film: np.ndarray, heatmap: np.ndarray, result: Mapping[str, Any], *, fmt: str = "pdf",
                 data_version: str | None = None, when: datetime | None = None, image_sha256: str | None = None,
                 cam_method: str | None = None, disclaimer: str = DISCLAIMER) -> bytes:
    """One page, as PDF or PNG bytes.

    film: (H,W) uint8 grey, the upload as shown (service: longest side <= 512);
    heatmap: (H,W,3) uint8, the Grad-CAM overlay on that film;
    result: the service's answer (label, probabilities, verdict, reason, message, novelty,
    in_distribution, model); data_version: model.json `data_md5`; when: the report's time (now).
    """
    fmt = fmt.lower()
    if fmt not in MEDIA_TYPES:
        raise ValueError(f"format must be one of {sorted(MEDIA_TYPES)}, not {fmt!r}")
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch

    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    lead, sub, refer = _answer_lines(result)
    with _lock, matplotlib.rc_context({"pdf.fonttype": 42, "font.family": "DejaVu Sans", "svg.fonttype": "none"}):
        fig = Figure(figsize=A4)
        FigureCanvasAgg(fig)
        fig.patch.set_facecolor("white")

        fig.text(0.07, 0.955, TITLE, fontsize=20, weight="bold", color=_INK)
        fig.text(0.07, 0.935, "covid-cxr: COVID / Normal / Viral Pneumonia triage from a chest X-ray",
                 fontsize=9.5, color=_MUTED)
        fig.text(0.07, 0.915, "Not for diagnostic use.", fontsize=10.5, weight="bold", color=_REFER_INK)

        # the answer first: the label, or the refer verdict
        face, edge, ink = (_REFER_FACE, _REFER_EDGE, _REFER_INK) if refer else (_OK_FACE, _OK_EDGE, _OK_INK)
        box_h = 0.045 + 0.019 * len(sub)
        y0 = 0.895 - box_h
        fig.add_artist(FancyBboxPatch((0.07, y0), 0.86, box_h, boxstyle="round,pad=0.004,rounding_size=0.01",
                                      transform=fig.transFigure, facecolor=face, edgecolor=edge, linewidth=1.2))
        lead_lines = textwrap.wrap(lead, 62)
        fig.text(0.09, y0 + box_h - 0.03, "\n".join(lead_lines[:2]), fontsize=14 if len(lead_lines) == 1 else 12,
                 weight="bold", color=ink, va="baseline")
        for k, line in enumerate(sub):
            fig.text(0.09, y0 + box_h - 0.052 - 0.019 * k, line, fontsize=10, color=ink, va="baseline")

        # the film and its heat map, in square panels
        top = y0 - 0.045
        side_w = 0.415
        side_h = side_w * A4[0] / A4[1]
        for k, (img, title, cmap) in enumerate([
            (film, "Uploaded image", "gray"),
            (heatmap, f"Grad-CAM: regions that raised {result['label']}", None),
        ]):
            ax = fig.add_axes((0.07 + 0.445 * k, top - side_h, side_w, side_h))
            ax.imshow(img, cmap=cmap, vmin=0, vmax=255, interpolation="lanczos" if img.shape[0] > 256 else "bilinear")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_axis_off()
            ax.set_anchor("N")          # a wide film sits under its title
            ax.set_title(title, fontsize=10.5, loc="left", color=_INK, pad=6)
        fig.text(0.515, top - side_h - 0.008, (cam_method or "grad-cam") + " (red: most). An explanation aid, "
                 "not a finding.", fontsize=8, color=_MUTED, va="top")

        # the confidence table
        ty = top - side_h - 0.05
        fig.text(0.07, ty, "Analysis report", fontsize=13, weight="bold", color=_INK)
        probs = result["probabilities"]
        rows = [[c, f"{100 * float(probs[c]):.2f}"] for c in CLASSES]
        tax = fig.add_axes((0.07, ty - 0.125, 0.5, 0.11))
        tax.axis("off")
        table = tax.table(cellText=rows, colLabels=["Class", "Confidence (%)"], colWidths=[0.62, 0.38],
                          cellLoc="left", colLoc="left", loc="upper left", edges="horizontal")
        table.auto_set_font_size(False)
        table.set_fontsize(10.5)
        table.scale(1, 1.55)
        for (r, c), cell in table.get_celld().items():
            cell.set_edgecolor("#d0d7de")
            if c == 1:
                cell.get_text().set_ha("right")
                cell._loc = "right"
            if r == 0:
                cell.get_text().set_weight("bold")
            elif CLASSES[r - 1] == result["label"]:
                cell.get_text().set_weight("bold")
                cell.set_facecolor(face)
        fig.text(0.6, ty - 0.03, "Probabilities are calibrated\non the validation split.",
                 fontsize=8.5, color=_MUTED, va="top")

        # versions and provenance
        nov = result.get("novelty")
        details = [
            ("Answer", "refer (" + str(result.get("reason")) + ")" if refer else "ok"),
            ("Model version", str(result.get("model") or "unknown")),
            ("Data version", str(data_version or "unknown")),
            ("Report date", when.strftime("%Y-%m-%d %H:%M UTC")),
            ("Novelty score", "n/a" if nov is None else f"{float(nov):.2f}"
             + ("" if result.get("in_distribution", True) else " (unlike the training films)")),
        ]
        if image_sha256:
            details.append(("Image SHA-256", image_sha256))
        dy = ty - 0.15
        for k, (key, val) in enumerate(details):
            fig.text(0.07, dy - 0.022 * k, key, fontsize=9.5, weight="bold", color=_INK, va="top")
            fig.text(0.27, dy - 0.022 * k, val, fontsize=9.5 if len(val) < 70 else 7.5, color=_INK, va="top",
                     family="DejaVu Sans Mono" if key in ("Model version", "Data version", "Image SHA-256") else None)

        # the note, boxed at the foot of the page
        note = disclaimer
        wrapped = textwrap.fill(note, 110)
        fig.add_artist(FancyBboxPatch((0.07, 0.035), 0.86, 0.05, boxstyle="round,pad=0.004,rounding_size=0.01",
                                      transform=fig.transFigure, facecolor="#f6f8fa", edgecolor="#d0d7de"))
        fig.text(0.09, 0.06, wrapped, fontsize=8.5, color=_INK, va="center")

        buf = io.BytesIO()
        if fmt == "pdf":
            fig.savefig(buf, format="pdf", metadata={"Title": TITLE, "Creator": "covid-cxr", "Author": None,
                                                     "Subject": None, "Keywords": None,
                                                     "CreationDate": when.replace(microsecond=0)})
        else:
            fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Title": TITLE, "Software": "covid-cxr"})
    return buf.getvalue()


def filename(image_sha256: str | None, fmt: str) -> str:
    """The download's name: no upload name in it (that may carry a patient's)."""
    return f"covid-cxr-report-{(image_sha256 or 'film')[:12]}.{fmt}"
