"""prepare: near-duplicate groups, the split (property-based) and the manifest."""
from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from pathlib import Path

import imgfactory as fx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from covid_cxr.data import prepare
from covid_cxr.cli import app
from covid_cxr.data.fingerprint import hamming

CLASSES = ("COVID", "Normal", "Viral Pneumonia")


# --------------------------------------------------------------------------- groups


@given(st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=60), st.integers(0, 6), st.randoms())
@settings(max_examples=60, deadline=None)
def test_near_pairs_matches_brute_force(base, bits, rnd):
    # plant close neighbours so that matches actually occur
    hashes = list(base)
    for h in base[:10]:
        flip = sum(1 << b for b in rnd.sample(range(64), rnd.randint(0, 8)))
        hashes.append(h ^ flip)
    hashes.append(None)
    want = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
            if hashes[i] is not None and hashes[j] is not None and hamming(hashes[i], hashes[j]) <= bits}
    assert set(prepare.near_pairs(hashes, bits, block=7)) == want


def _thumbs(arrays):
    from covid_cxr.data.fingerprint import encode_thumb
    from covid_cxr.data.xrayrule import thumbnail

    return [encode_thumb(thumbnail(a)) for a in arrays]


def _recrop(gray, crop):
    from PIL import Image

    h, w = gray.shape
    l, t, r, b = crop
    im = Image.fromarray(gray).crop((round(l * w), round(t * h), round(w - r * w), round(h - b * h)))
    return np.asarray(im.resize((w, h), Image.Resampling.BICUBIC))


def test_groups_join_recropped_copies_but_not_other_films():
    films = [fx.gray_array(256, seed) for seed in range(200, 206)]
    copies = [_recrop(films[0], (0.03, 0.02, 0.0, 0.04)), _recrop(films[3], (0.0, 0.04, 0.02, 0.01))]
    arrays = films + copies
    shas = [f"{k:x}" * 64 for k in range(len(arrays))]  # group names use the first 12 hex digits
    hashes = [None] * len(arrays)  # the hash alone never joins these: only the thumbnails decide
    g = prepare.group_ids(shas, hashes, 4, _thumbs(arrays), corr=0.85)
    assert g[6] == g[0] and g[7] == g[3]
    assert len(set(g)) == 6  # nothing else joined
    # without thumbnails (or without the bar) the copies stay alone, as before
    assert len(set(prepare.group_ids(shas, hashes, 4))) == 8
    assert len(set(prepare.group_ids(shas, hashes, 4, _thumbs(arrays), corr=None))) == 8


def test_same_film_pairs_skip_files_without_a_thumbnail():
    a = fx.gray_array(256, 7)
    thumbs = _thumbs([a, _recrop(a, (0.02, 0.02, 0.02, 0.02))])
    pairs = prepare.same_film_pairs([None, thumbs[0], None, thumbs[1]], 0.85)
    assert [(i, j) for i, j, _ in pairs] == [(1, 3)] and pairs[0][2] >= 0.95


def test_groups_join_exact_and_near_duplicates_transitively():
    shas = ["c" * 64, "a" * 64, "b" * 64, "a" * 64, "d" * 64, "e" * 64]
    # 0 ~ 2 (2 bits), 2 ~ 4 (3 bits) -> chain 0-2-4; 1 == 3 by sha; 5 alone; None never matches
    hashes = [0b0, 0xFFFF << 40, 0b11, None, 0b11100, None]
    g = prepare.group_ids(shas, hashes, bits=4)
    assert g[0] == g[2] == g[4] == "g" + ("b" * 12)  # named after the smallest sha in the group
    assert g[1] == g[3] == "g" + "a" * 12
    assert len({g[0], g[1], g[5]}) == 3


# --------------------------------------------------------------------------- split


@st.composite
def datasets(draw):
    """Items with labels, in groups of 1..4 (mostly 1), sometimes mixed-label groups."""
    n_groups = draw(st.integers(1, 400))
    sizes = draw(st.lists(st.sampled_from([1, 1, 1, 1, 2, 3, 4]), min_size=n_groups, max_size=n_groups))
    weights = draw(st.sampled_from([(1, 1, 1), (5, 4, 2), (1, 0, 0), (10, 1, 1)]))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    groups, labels = [], []
    for k, s in enumerate(sizes):
        lab = rnd.choices(CLASSES, weights)[0]
        for _ in range(s):
            groups.append(f"g{k:05d}")
            labels.append(lab if rnd.random() > 0.05 else rnd.choice(CLASSES))
    order = list(range(len(groups)))
    rnd.shuffle(order)
    return [groups[i] for i in order], [labels[i] for i in order]


FRACS = st.tuples(st.sampled_from([0.0, 0.1, 0.15, 0.2]), st.sampled_from([0.0, 0.1, 0.15, 0.25]))


@given(datasets(), st.integers(0, 10_000), FRACS)
@settings(max_examples=150, deadline=None)
def test_split_never_straddles_a_group_and_is_deterministic(data, seed, fracs):
    groups, labels = data
    v, t = fracs
    splits = prepare.assign_splits(groups, labels, seed, v, t)
    assert set(splits) <= {"train", "valid", "test"}
    per_group = defaultdict(set)
    for g, s in zip(groups, splits):
        per_group[g].add(s)
    assert all(len(s) == 1 for s in per_group.values())
    assert prepare.assign_splits(groups, labels, seed, v, t) == splits
    # the input order does not matter either
    idx = sorted(range(len(groups)), key=lambda i: (groups[i], i))
    again = prepare.assign_splits([groups[i] for i in idx], [labels[i] for i in idx], seed, v, t)
    assert [again[idx.index(i)] for i in range(len(groups))] == splits


@given(datasets(), st.integers(0, 10_000), FRACS)
@settings(max_examples=150, deadline=None)
def test_split_is_stratified(data, seed, fracs):
    groups, labels = data
    v, t = fracs
    splits = prepare.assign_splits(groups, labels, seed, v, t)
    members = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    # a group counts for its majority label (ties: first in name order), as documented
    glabel = {}
    for g, items in members.items():
        c = Counter(labels[i] for i in items)
        top = max(c.values())
        glabel[g] = min(k for k, n in c.items() if n == top)
    for cls in CLASSES:
        gs = [g for g in members if glabel[g] == cls]
        n = sum(len(members[g]) for g in gs)
        if n == 0:
            continue
        big = max(len(members[g]) for g in gs)
        for name, frac in (("valid", v), ("test", t)):
            got = sum(len(members[g]) for g in gs if splits[members[g][0]] == name)
            assert abs(got - frac * n) <= big, (cls, name, got, frac * n)


def test_split_changes_with_the_seed_and_hits_the_fractions():
    groups = [f"g{i}" for i in range(3000)]
    labels = [CLASSES[i % 3] for i in range(3000)]
    a = prepare.assign_splits(groups, labels, 1, 0.15, 0.15)
    b = prepare.assign_splits(groups, labels, 2, 0.15, 0.15)
    assert a != b
    for s in (a, b):
        c = Counter(s)
        assert (c["valid"], c["test"], c["train"]) == (450, 450, 2100)


def test_prepare_keeps_a_recropped_copy_in_its_films_split(data_dir, project):
    covid = fx.kaggle_dir(data_dir, "COVID")
    fx.recropped(covid / "COVID-0.png", covid / "COVID-0-crop.png", (0.04, 0.0, 0.02, 0.03))
    normal = fx.kaggle_dir(data_dir, "Normal")
    fx.recropped(normal / "Normal-1.png", normal / "Normal-1-crop.png", (0.02, 0.03, 0.03, 0.02), size=299)
    rows = {Path(r["path"]).name: r for r in prepare.build_manifest(project, use_cache=False)}
    assert len(rows) == 8
    for a, b in (("COVID-0.png", "COVID-0-crop.png"), ("Normal-1.png", "Normal-1-crop.png")):
        assert (rows[a]["group"], rows[a]["split"]) == (rows[b]["group"], rows[b]["split"])
    assert len({r["group"] for r in rows.values()}) == 6


# --------------------------------------------------------------------------- manifest


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_prepare_writes_the_manifest_contract(project, real_images):
    data = project / "data"
    for cls, files in real_images.items():
        d = fx.kaggle_dir(data, cls)
        for f in files:
            (d / f.name).write_bytes(f.read_bytes())
    covid = fx.kaggle_dir(data, "COVID")
    first = sorted(covid.glob("*.png"))[0]
    fx.resaved(first, covid / "zz-resaved-299.png", 299)  # near-duplicate: same group
    fx.recropped(first, covid / "zz-recropped.png", (0.02, 0.0, 0.01, 0.02))  # same film re-cropped: same group
    (covid / "zz-exact.png").write_bytes(first.read_bytes())  # exact duplicate: same group
    fx.truncated(fx.kaggle_dir(data, "Normal") / "broken.png")
    fx.png_gray(fx.kaggle_dir(data, "Pneumothorax") / "x.png", seed=5)  # unknown class: recorded as is
    fx.png_gray(data / fx.KAGGLE / "COVID" / "masks" / "m.png", seed=6)  # never a manifest row

    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["prepare"])
    assert r.exit_code == 0, r.output
    rows = read_manifest(project / "artifacts" / "data" / "manifest.csv")
    assert list(rows[0]) == list(prepare.MANIFEST_COLUMNS)
    by = {r["path"]: r for r in rows}
    assert len(rows) == 6 + 3 + 1 + 1
    assert all(p.startswith("data/COVID-19_Radiography_Dataset/") and "\\" not in p for p in by)
    assert all((project / p).is_file() for p in by)
    base = "data/COVID-19_Radiography_Dataset/"
    f = by[base + f"COVID/images/{first.name}"]
    assert (f["label"], f["width"], f["height"], f["mode"], int(f["bytes"])) == (
        "COVID", "256", "256", "L", first.stat().st_size)
    near, exact = by[base + "COVID/images/zz-resaved-299.png"], by[base + "COVID/images/zz-exact.png"]
    crop = by[base + "COVID/images/zz-recropped.png"]
    assert near["group"] == exact["group"] == crop["group"] == f["group"]
    assert near["split"] == exact["split"] == crop["split"] == f["split"]
    assert Counter(r["group"] for r in rows)[f["group"]] == 4  # and the other real films are not in it
    assert near["width"] == "299"
    broken = by[base + "Normal/images/broken.png"]
    assert broken["width"] == broken["height"] == broken["mode"] == "" and broken["label"] == "Normal"
    assert by[base + "Pneumothorax/images/x.png"]["label"] == "Pneumothorax"
    assert {r["split"] for r in rows} <= {"train", "valid", "test"}
    # deterministic: a second run (now from the stats cache) writes the same file
    before = (project / "artifacts" / "data" / "manifest.csv").read_bytes()
    assert CliRunner().invoke(app, ["prepare", "--no-cache"]).exit_code == 0
    assert (project / "artifacts" / "data" / "manifest.csv").read_bytes() == before
