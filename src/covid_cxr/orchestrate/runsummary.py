"""The retraining run's summary (a Prefect markdown artifact, key `retrain-summary`)."""
from __future__ import annotations

import collections
from typing import Any, Iterable

from covid_cxr.release.promotion import KEY_METRICS

# Metrics shown side by side with the champion's, in this order.
SUMMARY_METRICS = (*KEY_METRICS, "covid_specificity", "ece_after", "ood_false_flag_rate", "n_test")


def champion_metrics(champion: dict[str, Any] | None) -> dict[str, Any] | None:
    if not champion:
        return None
    m = champion.get("metrics", champion)
    return m if isinstance(m, dict) else None


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def summary_markdown(s: dict[str, Any]) -> str:
    """The run summary (a Prefect markdown artifact): data in, metrics vs champion, decisions."""
    ok = s.get("error") is None
    title = "FAILED" if not ok else "nothing new" if s.get("nothing_new") else "succeeded"
    out = [f"# Retraining run: {title}", ""]
    if not ok:
        out += [f"**Failed at step `{s.get('step')}`:**", "", "```", str(s["error"])[-3000:], "```", ""]
    out += [f"- project: `{s.get('root')}`"]
    if s.get("data_version"):
        out.append(f"- data version (data.dvc md5): `{s['data_version']}`")
    if s.get("commit"):
        out.append(f"- git commit of data.dvc: `{s['commit']}`")
    out.append("")
    out += inbox_markdown(s.get("inbox"))
    if s.get("nothing_new"):
        return "\n".join(out + ["Nothing new: no retraining, production unchanged.", ""])

    out += ["## Incoming data", ""]
    batches: Iterable[dict[str, Any]] = s.get("ingest") or []
    if not batches:
        out += ["No incoming batch in this run.", ""]
    else:
        out += ["| batch | checked | added | already present | rejected | quarantine |", "|---|---:|---:|---:|---:|---|"]
        reasons: collections.Counter[str] = collections.Counter()
        for b in batches:
            reasons.update(b.get("rejected_by_reason") or {})
            out.append(
                f"| {b['batch']} | {b['checked']} | {b['added']} | {b['skipped_identical']} | {b['rejected']} "
                f"| {('`' + b['quarantine'] + '`') if b.get('quarantine') else '–'} |"
            )
        out.append("")
        renamed = sum(b.get("renamed_on_clash", 0) for b in batches)
        if renamed:
            out += [f"{renamed} added file(s) clashed with a different file of the same name and were kept "
                    "under a new name.", ""]
        if reasons:
            try:
                from covid_cxr.data.rules import REASONS
            except Exception:  # pragma: no cover - the summary must not fail on an import
                REASONS = {}
            out += ["Rejected (quarantined), by reason:", "", "| reason | meaning | files |", "|---|---|---:|"]
            out += [f"| {k} | {REASONS.get(k, '')} | {v} |" for k, v in sorted(reasons.items())]
            out.append("")

    gate = s.get("gate")
    out += ["## Test metrics vs champion", ""]
    if gate:
        m = {**(s.get("metrics") or {}), **(gate.get("metrics") or {})}
        cm = champion_metrics(gate.get("champion") if gate.get("champion") is not None else s.get("champion")) or {}
        keys = [k for k in SUMMARY_METRICS if k in m or k in cm] or sorted(m)
        out += ["| metric | candidate | champion |", "|---|---:|---:|"]
        out += [f"| {k} | {_fmt(m.get(k))} | {_fmt(cm.get(k))} |" for k in keys]
        gc = gate.get("champion")
        if cm:
            how = ("re-scored on this run's test split" if isinstance(gc, dict) and gc.get("rescored")
                   else "as recorded when it was promoted")
            out += ["", f"Champion `{(gc or s.get('champion') or {}).get('bento')}`: {how}."]
        out += ["", f"## Gate: {'PASSED' if gate.get('passed') else 'FAILED'}", ""]
        out += [f"- {r}" for r in gate.get("reasons") or []] or ["- (no reasons given)"]
        out.append("")
    else:
        out += ["Not reached.", ""]

    out += ["## Bento and promotion", ""]
    if s.get("bento"):
        out.append(f"- Bento: `{s['bento']}`" + (f" (model `{s['model']}`)" if s.get("model") else ""))
    promo = s.get("promotion")
    if promo:
        out.append(f"- decision: **{promo['decision']}**")
        out += [f"  - {r}" for r in promo.get("reasons") or []]
    else:
        out.append("- not reached")
    champ = s.get("champion")
    out.append(f"- production before this run: `{champ.get('bento')}`" if champ else "- production before this run: none")
    if s.get("production_after") and s["production_after"] != champ:
        out.append(f"- production now: `{s['production_after'].get('bento')}`")
    elif champ:
        out.append("- registry/production.json unchanged")
    out.append("")
    return "\n".join(out)


def inbox_markdown(inbox: dict[str, Any] | None) -> list[str]:
    """The inbox section: which batches were new (by content key) and which were seen before."""
    if not inbox:
        return []
    out = ["## Inbox", "", f"`{inbox.get('path')}`: {len(inbox.get('new') or [])} new batch(es), "
           f"{len(inbox.get('seen') or [])} processed before (same content, whatever the folder name).", ""]
    rows = [(b, "new") for b in inbox.get("new") or []] + [(b, "processed before") for b in inbox.get("seen") or []]
    if rows:
        out += ["| batch | files | content key | status |", "|---|---:|---|---|"]
        out += [f"| {b['name']} | {b['files']} | `{b['key'][:16]}` | {st}"
                + (f" (as {b['seen_as']})" if b.get("seen_as") and b["seen_as"] != b["name"] else "") + " |"
                for b, st in rows]
        out.append("")
    return out
