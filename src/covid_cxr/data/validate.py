"""Stage `validate`: a Great Expectations suite over artifacts/data/manifest.csv.

Four frames are validated, all with GX (pandas datasource, ephemeral context):
- `manifest`: one row per image (label set, unique sha256/path, decodable, size bounds, modes, splits);
- `classes`: one row per class, derived (count >= min_per_class, share within validate.class_fraction);
- `splits`: one row per split and one per (class, split), derived (fraction within
  validate.split_tolerance of the requested one; the per-class rows check the stratification);
- `groups`: one row per near-duplicate group, derived (a group sits in exactly one split).

Writes artifacts/validation/summary.json (counts and pass/fail: a DVC metric), results.json
(every expectation with details) and GX Data Docs under
artifacts/validation/docs/. On failure: exit 1, naming each failed expectation with example files.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covid_cxr.config import CLASSES, Paths, load_params
from covid_cxr.data.prepare import MANIFEST_COLUMNS, SPLITS
N_EXAMPLES = 5


class ValidationFailed(RuntimeError):
    def __init__(self, summary: dict[str, Any], message: str):
        super().__init__(message)
        self.summary = summary


@dataclass
class Check:
    name: str
    expectation: Any
    description: str


@dataclass
class Table:
    name: str
    df: Any  # pandas.DataFrame
    index_cols: list[str]
    checks: list[Check] = field(default_factory=list)


# --------------------------------------------------------------------------- frames


def load_manifest(path: Path):
    import pandas as pd

    return pd.read_csv(
        path,
        dtype={"path": "string", "label": "string", "sha256": "string", "mode": "string", "group": "string",
               "split": "string", "width": "Int64", "height": "Int64", "bytes": "Int64"},
        keep_default_na=False, na_values={"width": [""], "height": [""], "bytes": [""], "mode": [""]},
    )


def _examples(paths, n: int = 3) -> str:
    paths = list(paths)
    more = f" (+{len(paths) - n} more)" if len(paths) > n else ""
    return ", ".join(paths[:n]) + more


def derived_frames(df, params: dict[str, Any]) -> dict[str, Any]:
    """The per-class, per-split and per-group tables that the suite validates."""
    import pandas as pd

    v, pp = params["validate"], params["prepare"]
    total = max(len(df), 1)
    rows = []
    for c in CLASSES:
        sub = df[df["label"] == c]
        lo, hi = v["class_fraction"][c]
        rows.append({"label": c, "count": len(sub), "fraction": len(sub) / total,
                     "min_fraction": float(lo), "max_fraction": float(hi), "examples": _examples(sub["path"])})
    classes = pd.DataFrame(rows)

    want = {"valid": float(pp["valid_frac"]), "test": float(pp["test_frac"])}
    want["train"] = 1.0 - want["valid"] - want["test"]
    tol = float(v["split_tolerance"])
    rows = []
    for scope, sub_all in [("all", df)] + [(c, df[df["label"] == c]) for c in CLASSES]:
        n = max(len(sub_all), 1)
        for s in SPLITS:
            sub = sub_all[sub_all["split"] == s]
            rows.append({"scope": scope, "split": s, "count": len(sub), "fraction": len(sub) / n,
                         "requested": want[s], "min_fraction": want[s] - tol, "max_fraction": want[s] + tol,
                         "examples": _examples(sub["path"])})
    splits = pd.DataFrame(rows)

    g = df.groupby("group", dropna=False)
    groups = pd.DataFrame({"n_images": g.size(), "n_splits": g["split"].nunique()}).reset_index()
    groups["examples"] = ""
    bad = groups["n_splits"] > 1  # example files only where they will be shown
    if bad.any():
        sub = df[df["group"].isin(set(groups.loc[bad, "group"]))]
        ex = {k: _examples([f"{p} ({s})" for p, s in zip(x["path"], x["split"])], 4) for k, x in sub.groupby("group")}
        groups.loc[bad, "examples"] = groups.loc[bad, "group"].map(ex)
    return {"classes": classes, "splits": splits, "groups": groups}


# --------------------------------------------------------------------------- suite


def build_tables(df, params: dict[str, Any]) -> list[Table]:
    import great_expectations as gx

    E = gx.expectations
    v = params["validate"]
    lo, hi = int(v["min_side"]), int(v["max_side"])
    d = derived_frames(df, params)

    manifest = Table("manifest", df, ["path"], [
        Check("columns", E.ExpectTableColumnsToMatchSet(column_set=list(MANIFEST_COLUMNS), exact_match=True),
              "the manifest has exactly the contract columns"),
        Check("not_empty", E.ExpectTableRowCountToBeBetween(min_value=1), "the manifest lists at least one image"),
        Check("label_set", E.ExpectColumnValuesToBeInSet(column="label", value_set=list(CLASSES)),
              f"every label is one of {', '.join(CLASSES)}"),
        Check("path_unique", E.ExpectColumnValuesToBeUnique(column="path"), "every path appears once"),
        Check("sha256_unique", E.ExpectColumnValuesToBeUnique(column="sha256"),
              "no two files have the same bytes (sha256)"),
        Check("decodable", E.ExpectColumnValuesToNotBeNull(column="mode"),
              "every file decodes as an image (mode is empty when it did not)"),
        Check("width_bounds", E.ExpectColumnValuesToBeBetween(column="width", min_value=lo, max_value=hi),
              f"width within [{lo}, {hi}] px"),
        Check("height_bounds", E.ExpectColumnValuesToBeBetween(column="height", min_value=lo, max_value=hi),
              f"height within [{lo}, {hi}] px"),
        Check("mode_set", E.ExpectColumnValuesToBeInSet(column="mode", value_set=list(v["modes"])),
              f"pixel mode is one of {list(v['modes'])}"),
        Check("bytes_positive", E.ExpectColumnValuesToBeBetween(column="bytes", min_value=1), "no 0-byte file"),
        Check("split_set", E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
              "split is train, valid or test"),
    ])
    classes = Table("classes", d["classes"], ["label", "examples"], [
        Check("min_per_class", E.ExpectColumnValuesToBeBetween(column="count", min_value=int(v["min_per_class"])),
              f"each class has at least {v['min_per_class']} images"),
        Check("class_fraction_min", E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="fraction", column_B="min_fraction", or_equal=True),
            "each class's share of the data is at least validate.class_fraction[class][0]"),
        Check("class_fraction_max", E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="max_fraction", column_B="fraction", or_equal=True),
            "each class's share of the data is at most validate.class_fraction[class][1]"),
    ])
    splits = Table("splits", d["splits"], ["scope", "split", "examples"], [
        Check("split_fraction_min", E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="fraction", column_B="min_fraction", or_equal=True),
            "each split's share (overall and per class) >= requested - validate.split_tolerance"),
        Check("split_fraction_max", E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="max_fraction", column_B="fraction", or_equal=True),
            "each split's share (overall and per class) <= requested + validate.split_tolerance"),
    ])
    groups = Table("groups", d["groups"], ["group", "examples"], [
        Check("group_one_split", E.ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1),
              "no near-duplicate group straddles splits"),
    ])
    for t in (manifest, classes, splits, groups):
        for c in t.checks:
            c.expectation.meta = {"name": c.name}
            c.expectation.description = c.description
    return [manifest, classes, splits, groups]


def _context(docs_dir: Path | None):
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites["local_site"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    cfg = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
        data_docs_sites=sites,
    )
    return gx.get_context(mode="ephemeral", project_config=cfg)


def run_suite(df, params: dict[str, Any], docs_dir: Path | None = None) -> dict[str, Any]:
    """Validate the manifest frame; return the summary (never raises for failed expectations)."""
    import great_expectations as gx

    tables = build_tables(df, params)
    ctx = _context(docs_dir)
    ds = ctx.data_sources.add_pandas("covid_cxr")
    expectations: dict[str, Any] = {}
    failed: list[dict[str, Any]] = []
    for t in tables:
        bd = ds.add_dataframe_asset(t.name).add_batch_definition_whole_dataframe(t.name)
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"covid_cxr_{t.name}"))
        for c in t.checks:
            suite.add_expectation(c.expectation)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=t.name, data=bd, suite=suite))
        cp = ctx.checkpoints.add(gx.Checkpoint(
            name=f"cp_{t.name}", validation_definitions=[vd],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": t.index_cols},
        ))
        res = cp.run(batch_parameters={"dataframe": t.df})
        for vr in res.run_results.values():
            for er in vr.results:
                name = er.expectation_config.meta.get("name", er.expectation_config.type)
                r = er.result or {}
                entry = {
                    "success": bool(er.success),
                    "table": t.name,
                    "expectation": er.expectation_config.type,
                    "description": er.expectation_config.description,
                    "unexpected": r.get("unexpected_count"),
                }
                if r.get("observed_value") is not None:
                    entry["observed"] = r["observed_value"]
                if er.exception_info and er.exception_info.get("raised_exception"):
                    entry["error"] = str(er.exception_info.get("exception_message"))
                expectations[name] = entry
                if not er.success:
                    failed.append({"name": name, **entry, "examples": _failure_examples(t, r)})
    if docs_dir is not None:  # once, over all four results (an UpdateDataDocsAction per checkpoint re-renders them all)
        ctx.build_data_docs()
    counts = {
        "images": int(len(df)),
        **{c: int((df["label"] == c).sum()) for c in CLASSES},
        **{s: int((df["split"] == s).sum()) for s in SPLITS},
        "groups": int(df["group"].nunique()),
        "near_duplicate_groups": int((df.groupby("group").size() > 1).sum()),
    }
    return {
        "success": not failed,
        "counts": counts,
        "n_expectations": len(expectations),
        "n_failed": len(failed),
        "failed": [f["name"] for f in failed],
        "expectations": expectations,
        "failures": failed,
    }


def _plain(x: Any) -> str:
    if hasattr(x, "item"):
        x = x.item()
    if x is None or (isinstance(x, float) and x != x) or str(x) == "<NA>":
        return "(empty)"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _failure_examples(t: Table, r: dict[str, Any]) -> list[str]:
    """Readable rows: 'path: col=value' (manifest) or 'scope=all split=test: fraction=...; files ...'."""
    out = []
    for row in (r.get("unexpected_index_list") or [])[:N_EXAMPLES]:
        if not isinstance(row, dict):
            out.append(str(row))
            continue
        keys = [k for k in t.index_cols if k != "examples" and k in row]
        key = _plain(row[keys[0]]) if keys == ["path"] else " ".join(f"{k}={_plain(row[k])}" for k in keys)
        vals = ", ".join(f"{k}={_plain(v)}" for k, v in row.items() if k not in t.index_cols)
        ex = f"; files: {row['examples']}" if row.get("examples") else ""
        out.append(f"{key}: {vals}{ex}")
    if not out and r.get("partial_unexpected_list"):
        out = [_plain(x) for x in r["partial_unexpected_list"][:N_EXAMPLES]]
    if not out and r.get("observed_value") is not None:
        out = [f"observed: {r['observed_value']}"]
    return out


def failure_message(summary: dict[str, Any]) -> str:
    lines = [f"Data validation FAILED: {summary['n_failed']} of {summary['n_expectations']} expectations."]
    for f in summary["failures"]:
        n = f" ({f['unexpected']} unexpected)" if f.get("unexpected") else ""
        lines.append(f"- {f['name']} [{f['table']}]: {f['description']}{n}")
        for ex in f["examples"]:
            lines.append(f"    {ex}")
        if f.get("error"):
            lines.append(f"    error: {f['error']}")
    return "\n".join(lines)


def run(root: Path | None = None, *, docs: bool = True) -> dict[str, Any]:
    """Validate artifacts/data/manifest.csv; write summary.json and Data Docs; raise ValidationFailed."""
    paths = Paths(root)
    params = load_params(paths.root / "params.yaml")
    if not paths.manifest.exists():
        raise FileNotFoundError(f"{paths.manifest} is missing: run `covid-cxr prepare` (or dvc repro prepare)")
    df = load_manifest(paths.manifest)
    out = paths.validation
    docs_dir = out / "docs"
    if docs_dir.exists():
        shutil.rmtree(docs_dir)  # a DVC output: only this run's pages
    out.mkdir(parents=True, exist_ok=True)
    summary = run_suite(df, params, docs_dir if docs else None)
    if docs:
        summary["docs"] = os.path.relpath(docs_dir / "index.html", paths.root)
    # results.json: every expectation with its details; summary.json: the numbers (a DVC metric).
    metric = {k: summary[k] for k in ("success", "n_expectations", "n_failed", "counts", "failed") if k in summary}
    for name, obj in (("results.json", summary), ("summary.json", metric)):
        tmp = out / f"{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(tmp, out / name)
    if not summary["success"]:
        raise ValidationFailed(summary, failure_message(summary))
    return summary


def register(app, data_app) -> None:
    import typer

    @app.command("validate")
    def validate_cmd(
        docs: bool = typer.Option(True, "--docs/--no-docs", help="Build GX Data Docs under artifacts/validation/docs."),
    ) -> None:
        """Stage validate: Great Expectations suite over the manifest -> artifacts/validation/summary.json."""
        try:
            s = run(docs=docs)
        except ValidationFailed as e:
            typer.echo(str(e), err=True)
            typer.echo("Details: artifacts/validation/results.json and artifacts/validation/docs/index.html", err=True)
            raise typer.Exit(1)
        c = s["counts"]
        typer.echo(
            f"Data validation passed: {s['n_expectations']} expectations on {c['images']} images "
            f"({', '.join(f'{k} {c[k]}' for k in CLASSES)}; train {c['train']} / valid {c['valid']} / test {c['test']})."
        )
        if docs:
            typer.echo(f"Data Docs: {s['docs']}")
