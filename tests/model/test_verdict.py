"""The verdict rule, the novelty model, the external figures and the gate's external checks."""
import numpy as np
import pytest
import torch

from covid_cxr.evaluation.external import NONE, group_summary
from covid_cxr.release.gate import decide
from covid_cxr.model.modelmeta import migrate
from covid_cxr.model.novelty import Novelty
from covid_cxr.model.verdict import Policy, decide as verdict, fit_min_confidence

P = np.array([[0.98, 0.01, 0.01], [0.5, 0.3, 0.2], [0.97, 0.02, 0.01], [0.9, 0.05, 0.05]])


def test_reasons_in_order_of_precedence():
    pol = Policy(min_confidence=0.6, covid_triage=None)
    v, r = verdict(P, np.array([False, False, True, True]), pol, [None, None, None, "not_xray_colour"])
    assert v == ["ok", "refer", "refer", "refer"]
    assert r == [None, "low_confidence", "outside_training_data", "not_an_xray"]


def test_no_novelty_model_and_zero_floor_refer_nothing():
    v, r = verdict(P, None, Policy(min_confidence=0.0, covid_triage=None))
    assert v == ["ok"] * 4 and r == [None] * 4


def test_min_confidence_is_the_valid_quantile():
    rng = np.random.default_rng(0)
    top = rng.uniform(0.4, 1.0, 1000)
    probs = np.stack([top, (1 - top) / 2, (1 - top) / 2], 1)
    t = fit_min_confidence(probs, 0.02)
    assert (top < t).mean() == pytest.approx(0.02, abs=0.002)


def test_novelty_sees_content_and_style_and_flags_about_the_quantile():
    rng = np.random.default_rng(0)
    n, y = 600, np.repeat([0, 1, 2], 200)
    content = rng.normal(0, 1, (n, 40)) + y[:, None]
    style = rng.normal(0, 1, (n, 12))
    vc, vs = rng.normal(0, 1, (300, 40)) + np.repeat([0, 1, 2], 100)[:, None], rng.normal(0, 1, (300, 12))
    nov = Novelty.fit({"content": content, "style": style}, y,
                      {"content": torch.tensor(vc, dtype=torch.float32), "style": torch.tensor(vs, dtype=torch.float32)},
                      0.98, {"content": 16, "style": 8}, ("content", "style"), 1.0, combine="max")
    s_valid = nov.score(torch.tensor(vc, dtype=torch.float32), torch.tensor(vs, dtype=torch.float32))
    assert (s_valid > nov.threshold).float().mean() == pytest.approx(0.02, abs=0.01)
    # a batch whose content is typical but whose style is shifted is flagged through the style part alone
    tc = torch.tensor(rng.normal(0, 1, (50, 40)), dtype=torch.float32)
    ts = torch.tensor(rng.normal(4, 1, (50, 12)), dtype=torch.float32)
    assert (nov.score(tc, ts) > nov.threshold).float().mean() > 0.9
    assert (nov.score(tc, torch.tensor(rng.normal(0, 1, (50, 12)), dtype=torch.float32)) > nov.threshold
            ).float().mean() < 0.2
    # round trip through the safetensors layout
    again = Novelty.from_tensors(nov.tensors(), nov.describe())
    torch.testing.assert_close(again.score(tc, ts), nov.score(tc, ts))


def test_energy_part_flags_films_no_class_claims():
    rng = np.random.default_rng(1)
    sharp = torch.tensor(rng.normal(0, 1, (400, 3)) + np.eye(3)[rng.integers(0, 3, 400)] * 8, dtype=torch.float32)
    feats = torch.zeros(400, 4)
    nov = Novelty.fit({"content": feats.numpy() + rng.normal(0, 1, (400, 4))}, rng.integers(0, 3, 400),
                      {"content": feats + torch.tensor(rng.normal(0, 1, (400, 4)), dtype=torch.float32),
                       "logits": sharp}, 0.99, {"content": 4}, ("content", "energy"), 1.0, combine="max")
    flat = torch.zeros(20, 3)  # no class stands out: high energy
    x = torch.tensor(rng.normal(0, 1, (20, 4)), dtype=torch.float32)
    assert (nov.score(x, None, flat) > nov.threshold).all()
    assert set(nov.part_scores(x, None, flat)) == {"content", "energy"}
    again = Novelty.from_tensors(nov.tensors(), nov.describe())
    torch.testing.assert_close(again.score(x, None, flat), nov.score(x, None, flat))


def test_knn_part_flags_a_film_between_the_sources_of_one_class():
    # one class made of two far-apart sources (as COVID is): a film halfway between them sits near
    # the class mean, so the Gaussian part calls it typical; its nearest training films are far
    rng = np.random.default_rng(2)
    d = 16
    src = np.zeros((2, d))
    src[0, 0], src[1, 0] = -6.0, 6.0
    train = np.concatenate([src[i] + rng.normal(0, 1, (300, d)) for i in (0, 1)])
    valid = torch.tensor(np.concatenate([src[i] + rng.normal(0, 1, (150, d)) for i in (0, 1)]), dtype=torch.float32)
    y = np.zeros(len(train), int)
    between = torch.tensor(rng.normal(0, 1, (40, d)), dtype=torch.float32)  # halfway: the class mean
    knn = Novelty.fit({"content": train}, y, {"content": valid}, 0.99, {"knn": 8}, ("knn",), 1.0, 10, combine="max")
    gauss = Novelty.fit({"content": train}, y, {"content": valid}, 0.99, {"content": 8}, ("content",), 1.0,
                        combine="max")
    assert (knn.score(between) > knn.threshold).float().mean() > 0.9
    assert (gauss.score(between) > gauss.threshold).float().mean() < 0.1
    assert (knn.score(valid) > knn.threshold).float().mean() == pytest.approx(0.01, abs=0.01)
    again = Novelty.from_tensors(knn.tensors(), knn.describe())
    torch.testing.assert_close(again.score(between), knn.score(between))
    assert knn.describe()["components"] == {"knn": 8}


def test_knn_part_needs_its_k():
    x = np.random.default_rng(0).normal(0, 1, (50, 4))
    with pytest.raises(ValueError, match="knn_k"):
        Novelty.fit({"content": x}, np.zeros(50, int), {"content": torch.tensor(x, dtype=torch.float32)},
                    0.99, {"knn": 2}, ("knn",), 1.0, combine="max")


def test_group_summary_counts_right_flagged_and_confident_wrong():
    labels = ["Normal"] * 5
    pred = ["Normal", "COVID", "COVID", "COVID", "Normal"]
    top = np.array([0.95, 0.95, 0.7, 0.99, 0.99])
    verd = ["ok", "ok", "ok", "refer", "refer"]
    reason = [None, None, None, "outside_training_data", "low_confidence"]
    g = group_summary(labels, pred, top, verd, reason, 0.9)
    assert g["n"] == 5 and g["right"] == 0.4 and g["flagged"] == 0.4
    assert g["confident_wrong"] == 0.2          # only #2: #3 is not confident, #4 is referred
    assert g["right_or_flagged"] == 0.6          # #0, #3 (referred), #4 (right)
    assert g["label_mix"]["COVID"] == 0.6 and g["refer_reasons"]["low_confidence"] == 0.2


def test_unlabelled_group_every_label_is_wrong():
    g = group_summary([NONE] * 3, ["COVID", "Normal", "COVID"], np.array([0.95, 0.5, 0.91]),
                      ["ok", "ok", "refer"], [None, None, "low_confidence"], 0.9)
    assert g["right"] is None and g["right_or_flagged"] is None
    assert g["confident_wrong"] == pytest.approx(1 / 3) and g["flagged"] == pytest.approx(1 / 3)


GATE = {"min_accuracy": 0.97, "max_flagged": 0.03,
        "external": {"unseen_hospital_normal": {"max_confident_wrong": 0.05, "min_right_or_flagged": 0.9},
                     "tuberculosis": {"min_flagged": 0.3}}}
OK_EXT = {"groups": {"unseen_hospital_normal": {"confident_wrong": 0.01, "right_or_flagged": 0.95},
                     "tuberculosis": {"flagged": 0.5}}}


def test_gate_checks_external_groups_and_test_flagged_share():
    assert decide({"accuracy": 0.99, "flagged": 0.02}, GATE, external=OK_EXT)["passed"]
    bad = {"groups": {**OK_EXT["groups"], "tuberculosis": {"flagged": 0.1}}}
    r = decide({"accuracy": 0.99, "flagged": 0.02}, GATE, external=bad)
    assert not r["passed"] and r["reasons"] == ["external tuberculosis flagged = 0.1000 is below the threshold 0.3"]
    r = decide({"accuracy": 0.99, "flagged": 0.05}, GATE, external=OK_EXT)
    assert not r["passed"] and "flagged" in r["reasons"][0]


def test_gate_fails_when_external_figures_are_missing():
    r = decide({"accuracy": 0.99, "flagged": 0.0}, GATE, external=None)
    assert not r["passed"] and all("missing" in x for x in r["reasons"]) and len(r["reasons"]) == 3


def _two_parts(rng, per_class: int, d_content: int, d_style: int):
    """Train and valid films of three classes: content shifted by class, style the same for all.
    -> (train content, train style, train labels, valid content, valid style)."""
    y = np.repeat([0, 1, 2], per_class)
    content, style = rng.normal(0, 1, (len(y), d_content)) + y[:, None], rng.normal(0, 1, (len(y), d_style))
    vc = torch.tensor(rng.normal(0, 1, (len(y), d_content)) + y[:, None], dtype=torch.float32)
    vs = torch.tensor(rng.normal(0, 1, (len(y), d_style)), dtype=torch.float32)
    return content, style, y, vc, vs


def test_a_part_scaled_at_a_higher_quantile_takes_a_smaller_share_but_still_refers_its_extremes():
    rng = np.random.default_rng(3)
    content, style, y, vc, vs = _two_parts(rng, 200, 40, 12)

    def fit(pq):
        return Novelty.fit({"content": content, "style": style}, y, {"content": vc, "style": vs}, 0.95,
                           {"content": 16, "style": 8}, ("content", "style"), 1.0, None, pq, combine="max")

    def style_share(nov):
        parts = nov.part_scores(vc, vs)
        referred = nov.score(vc, vs) > nov.threshold
        return float((referred & (parts["style"] >= parts["content"])).float().mean())

    even, narrow = fit(None), fit({"style": 0.999})
    assert narrow.scales["style"] > even.scales["style"] and narrow.scales["content"] == even.scales["content"]
    # the one budget (5 % of valid) is kept, and the style part's share of it shrinks
    for nov in (even, narrow):
        assert (nov.score(vc, vs) > nov.threshold).float().mean() == pytest.approx(0.05, abs=0.01)
    assert style_share(narrow) < style_share(even) / 2
    # a film far off in style (a photograph, say) is still referred through the style part alone
    far = torch.tensor(rng.normal(8, 1, (20, 12)), dtype=torch.float32)
    typical = vc[:20]
    assert bool((narrow.score(typical, far) > narrow.threshold).all())


def test_summed_parts_add_up_evidence_that_the_largest_part_alone_misses():
    rng = np.random.default_rng(4)
    content, style, y, vc, vs = _two_parts(rng, 300, 20, 10)

    def fit(combine):
        return Novelty.fit({"content": content, "style": style}, y, {"content": vc, "style": vs}, 0.98,
                           {"content": 8, "style": 6}, ("content", "style"), 1.0, combine=combine)

    mx, sm = fit("max"), fit("sum")
    assert mx.describe()["combine"] == "max" and sm.describe()["combine"] == "sum"
    for nov in (mx, sm):   # the same valid budget either way
        assert (nov.score(vc, vs) > nov.threshold).float().mean() == pytest.approx(0.02, abs=0.006)
    parts = sm.part_scores(vc, vs)
    torch.testing.assert_close(sm.score(vc, vs), parts["content"] + parts["style"])
    torch.testing.assert_close(mx.score(vc, vs), torch.maximum(parts["content"], parts["style"]))
    # films from the same distribution that are somewhat unusual in both parts (each over its valid
    # 93rd percentile) and extreme in neither (the largest under the max rule's threshold):
    # their sum is over the sum rule's threshold, so that rule alone refers them
    pool_c = torch.tensor(rng.normal(0, 1, (20000, 20)) + rng.integers(0, 3, 20000)[:, None], dtype=torch.float32)
    pool_s = torch.tensor(rng.normal(0, 1, (20000, 10)), dtype=torch.float32)
    pp = sm.part_scores(pool_c, pool_s)
    q93 = {k: torch.quantile(v, 0.93) for k, v in parts.items()}
    both = (pp["content"] > q93["content"]) & (pp["style"] > q93["style"]) & (mx.score(pool_c, pool_s) <= mx.threshold)
    assert both.sum() >= 10
    assert (sm.score(pool_c, pool_s)[both] > sm.threshold).float().mean() > 0.8
    # ... while a film unusual in one part only is referred by both rules
    far = torch.tensor(rng.normal(5, 1, (30, 10)), dtype=torch.float32)
    typical = vc[:30]
    assert (sm.score(typical, far) > sm.threshold).all() and (mx.score(typical, far) > mx.threshold).all()
    # the rule travels with the model; files saved before it existed load as max
    again = Novelty.from_tensors(sm.tensors(), sm.describe())
    torch.testing.assert_close(again.score(vc, vs), sm.score(vc, vs))
    old = {k: v for k, v in mx.describe().items() if k != "combine"}   # a model.json from before `combine`
    old = migrate({"ood": old, "verdict": {"min_confidence": 0.1}})["ood"]
    torch.testing.assert_close(Novelty.from_tensors(mx.tensors(), old).score(vc, vs), mx.score(vc, vs))
    with pytest.raises(ValueError, match="verdict.combine"):
        fit("mean")
