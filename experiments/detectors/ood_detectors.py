"""Which novelty score sees films from outside the training sources? A study on one trained model.

For a model directory, computes once per split (train, valid, test) and per external group:
pooled features, logits, and the per-channel mean / log-std of every body module's output.
Then, for each candidate detector, fits it on train, sets its threshold at the valid quantile
`--quantile`, and prints the share flagged on test and on each external group. Thresholds are
fitted on valid only; external films are only scored.

    .venv/bin/python experiments/detectors/ood_detectors.py .cache/experiments/acq+ls0.1/model
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covid_cxr.config import CLASSES, Paths
from covid_cxr.data.cache import decoded
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.novelty import OodModel
from covid_cxr.evaluation.scoring import load_film


def embed_all(model, imgs: np.ndarray, bs: int = 64):
    net = model.net
    pooled, logits, stats = [], [], []
    with torch.inference_mode():
        for i in range(0, len(imgs), bs):
            x = model.to_input(np.asarray(imgs[i:i + bs]))
            per = []
            for m in net.body:
                x = m(x)
                f = x.float().flatten(2)
                per.append(torch.cat([f.mean(2), f.std(2).clamp_min(1e-6).log()], 1))
            p = net.pool(x)
            pooled.append(p)
            logits.append(net.head(p))
            stats.append(per)
    layers = [torch.cat([s[k] for s in stats]).numpy() for k in range(len(stats[0]))]
    return torch.cat(pooled).numpy(), torch.cat(logits).numpy(), layers


def knn_detector(emb, k: int = 10):
    """Minus the cosine similarity of the k-th nearest train film's pooled features."""
    tr = emb["train"][0] / np.linalg.norm(emb["train"][0], axis=1, keepdims=True)

    def score(key):
        x = emb[key][0] / np.linalg.norm(emb[key][0], axis=1, keepdims=True)
        sim = x @ tr.T
        if key == "train":
            np.fill_diagonal(sim, -1)
        return -np.sort(sim, 1)[:, -k]
    return score


def union_study(emb, ytr, T, report, maha) -> None:
    """Several detectors from one forward pass, each at its own valid quantile; flagged = any."""
    content = maha(lambda k: emb[k][0])
    style = maha(lambda k: np.concatenate([emb[k][2][i] for i in (1, 3, 6)], 1), 32)
    mid = maha(lambda k: np.concatenate([emb[k][2][i] for i in range(7, 14)], 1), 64)

    def energy(key):
        z = emb[key][1] / T
        m = z.max(1)
        return -(np.log(np.exp(z - m[:, None]).sum(1)) + m)
    from sklearn.decomposition import PCA

    pca = PCA(128, random_state=0).fit(emb["train"][0])
    tr = pca.transform(emb["train"][0])
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)

    def knn(key, k=10):
        x = pca.transform(emb[key][0])
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ tr.T
        if key == "train":
            np.fill_diagonal(sim, -1)
        return -np.sort(sim, 1)[:, -k]
    dets = {"content": content, "style": style, "mid": mid, "energy": energy, "knn": knn}
    s = {n: {k: f(k) for k in emb} for n, f in dets.items()}
    report("knn-10 on PCA-128 (alone)", lambda k: s["knn"][k])
    for q in (0.995, 0.993, 0.99):
        for names in (("content", "style"), ("knn", "energy"), ("knn", "mid", "energy"),
                      ("content", "style", "mid", "energy", "knn")):
            def flag(key, names=names, q=q):
                out = np.zeros(len(s[names[0]][key]), bool)
                for n in names:
                    out |= s[n][key] > np.quantile(s[n]["valid"], q)
                return out.astype(float)
            row = " | ".join(f"{k} {100 * flag(k).mean():5.1f}" for k in emb if k != "train")
            print(f"union q{q} {'+'.join(names):<34} | {row}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--union", action="store_true", help="only the union-of-detectors study")
    args = ap.parse_args()
    paths = Paths()
    model = load_model(args.model_dir)
    df = pd.read_csv(paths.manifest)
    y_all = df["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    sets = {}
    for split in ("train", "valid", "test"):
        sub = df[df["split"] == split].reset_index(drop=True)
        sets[split] = (decoded(sub, model.size, paths.root, paths.cache), y_all[df["split"].to_numpy() == split])
    ext = pd.read_csv(paths.root / "external" / "labels.csv")
    for g in sorted(ext["group"].unique()):
        files = ext[ext["group"] == g]["file"]
        sets[g] = (np.stack([load_film(paths.root / "external" / f, model.size, model.min_side)[0] for f in files]), None)
    cache = args.model_dir / "detector_study.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        emb = {k: (z[f"{k}/pooled"], z[f"{k}/logits"], [z[f"{k}/layer{i}"] for i in range(int(z[f"{k}/n"]))])
               for k in sets}
    else:
        emb = {k: embed_all(model, v[0]) for k, v in sets.items()}
        np.savez(cache, **{f"{k}/{n}": a for k, (p_, l_, ls) in emb.items()
                           for n, a in [("pooled", p_), ("logits", l_), ("n", np.array(len(ls)))]
                           + [(f"layer{i}", x) for i, x in enumerate(ls)]})
    ytr = sets["train"][1]
    T = model.temperature

    def report(name: str, score_fn) -> None:
        s = {k: score_fn(k) for k in emb}
        t = np.quantile(s["valid"], args.quantile)
        row = " | ".join(f"{k} {100 * (s[k] > t).mean():5.1f}" for k in emb if k not in ("train", "valid"))
        print(f"{name:<34} | {row}")

    def maha(feat_fn, k=64):
        m = OodModel.fit(feat_fn("train"), ytr, n_components=k)
        return lambda key: m.score(torch.as_tensor(feat_fn(key))).numpy()

    print(f"model {args.model_dir}  size {model.size}  T {T:.3f}  threshold: valid q{args.quantile}")
    if args.union:
        union_study(emb, ytr, T, report, maha)
        return
    report("content: pooled maha64", maha(lambda k: emb[k][0]))
    report("style: layers 1,3,6", maha(lambda k: np.concatenate([emb[k][2][i] for i in (1, 3, 6)], 1), 32))
    n_layers = len(emb["train"][2])
    for i in range(n_layers):
        report(f"layer {i} mean+logstd maha", maha(lambda k, i=i: emb[k][2][i], 32))
    report("mid: layers 7-13", maha(lambda k: np.concatenate([emb[k][2][i] for i in range(7, 14)], 1), 64))
    report("deep: layers 14-18", maha(lambda k: np.concatenate([emb[k][2][i] for i in range(14, 19)], 1), 64))
    report("all layers 0-18", maha(lambda k: np.concatenate(emb[k][2], 1), 64))

    def energy(key):
        z = emb[key][1] / T
        return -(np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1))
    report("energy (T-scaled logits)", energy)

    def msp(key):
        z = emb[key][1] / T
        p = np.exp(z - z.max(1, keepdims=True))
        return -(p / p.sum(1, keepdims=True)).max(1)
    report("1 - max softmax (calibrated)", msp)
    knn = knn_detector(emb)
    report("kNN-10 cosine, pooled", knn)

    # a frozen ImageNet backbone: features not collapsed onto the three classes
    from covid_cxr.model.checkpoint import LoadedModel
    from covid_cxr.model.nets import build

    frozen = LoadedModel(net=build(model.meta["arch"], pretrained=True).eval(), meta=model.meta)
    pre = {k: embed_all(frozen, v[0]) for k, v in sets.items()}
    report("pretrained pooled maha64", maha(lambda k: pre[k][0]))
    report("pretrained pooled maha16", maha(lambda k: pre[k][0], 16))
    knn_pre = knn_detector(pre)
    report("pretrained kNN-10 cosine", knn_pre)
    report("pretrained layers 7-13 maha", maha(lambda k: np.concatenate([pre[k][2][i] for i in range(7, 14)], 1), 64))

    def combo(fns, q):
        scales = [np.quantile(f("valid"), q) for f in fns]
        return lambda key: np.max([f(key) / s for f, s in zip(fns, scales)], 0)
    for q in (0.99, 0.995):
        report(f"max(kNN, energy, pre-kNN) q{q}", combo([knn, energy, knn_pre], q))


if __name__ == "__main__":
    main()
