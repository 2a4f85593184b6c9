"""Small helpers that turn tables and plots into Dagster metadata (markdown previews, inline PNGs)."""

from __future__ import annotations

import base64
import io
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import matplotlib

matplotlib.use("Agg")  # no display on pipeline workers
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def md_preview(df: pd.DataFrame, max_rows: int = 10, max_chars: int = 60) -> dg.MetadataValue:
    """The first rows of ``df`` as a markdown table (long cells cut to ``max_chars``)."""
    head = df.head(max_rows).copy()
    for col in head.columns:
        if head[col].dtype == object:
            head[col] = head[col].map(
                lambda v: s if len(s := str(v)) <= max_chars else s[: max_chars - 1] + "…"
            )
    return dg.MetadataValue.md(head.to_markdown(index=False, floatfmt=".4g"))


def _cell(value: Any) -> Any:
    """A JSON-safe table cell: NaN/None -> None (the UI cannot parse NaN), floats to 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(f"{float(value):.4g}")
    return str(value)


def table_metadata(df: pd.DataFrame) -> dg.MetadataValue:
    """``df`` as Dagster table metadata (schema + records), which the UI renders inline on the asset page
    (markdown over 1,000 characters hides behind "[Show Markdown]")."""
    kinds = {"b": "bool", "i": "int", "u": "int", "f": "float"}
    schema = dg.TableSchema(
        columns=[dg.TableColumn(str(c), kinds.get(df[c].dtype.kind, "string")) for c in df.columns]
    )
    records = [dg.TableRecord({str(k): _cell(v) for k, v in row.items()}) for row in df.to_dict("records")]
    return dg.MetadataValue.table(records, schema=schema)


# Where `mlflow ui --backend-store-uri ...` serves by default; SHAPEGRPO_MLFLOW_UI_URL points elsewhere.
DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"


def mlflow_ui_url(tracking_uri: str) -> str:
    """The MLflow UI that serves this store: SHAPEGRPO_MLFLOW_UI_URL, else an http(s) tracking server
    itself, else the local ``mlflow ui`` default."""
    if url := os.environ.get("SHAPEGRPO_MLFLOW_UI_URL"):
        return url.rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_MLFLOW_UI_URL


def mlflow_artifact_image_md(ui_url: str, run_id: str, artifact_path: str, alt: str) -> dg.MetadataValue:
    """A short markdown image of a run's PNG artifact as the MLflow UI serves it (``/get-artifact``): short
    enough for the Dagster UI to render inline while that MLflow UI runs."""
    query = urllib.parse.urlencode({"path": artifact_path, "run_uuid": run_id})
    return dg.MetadataValue.md(f"![{alt}]({ui_url}/get-artifact?{query})")


COMPARISON_MARKER = "=" * 30 + " ShapE-GRPO method comparison " + "=" * 30


def comparison_summary(result: Mapping[str, Any]) -> str:
    """What the end of a comparison run prints: the table, the verdict and where the report is."""
    hidden = {"train_run_id", "eval_run_id"}
    table = pd.DataFrame(result["table"])
    table = table.drop(columns=[c for c in table.columns if c in hidden])
    references = ", ".join(f"{k} {v:.4g}" for k, v in result.get("reference_lines", {}).items())
    collapsed = [r["method"] for r in result["table"] if r.get("collapsed") is True]
    lines = [
        COMPARISON_MARKER,
        table.to_markdown(index=False, floatfmt=".4g"),
        "",
        f"Reference lines: {references}",
        f"Collapsed runs (most groups identical at the end of training): {', '.join(collapsed) or 'none'}",
        f"Winner by {result['metric']}: {result['winner'] or 'no significant winner'} ({result['reason']})",
        f"Aliases moved: {result['aliases_moved'] or 'none'}",
        f"Report: {result['report_path']}",
        f"Learning curves: {result['learning_curves_path']}",
        f"MLflow compare run: {result['mlflow_run_id']}",
        "=" * len(COMPARISON_MARKER),
    ]
    return "\n".join(lines)


def figure_png(fig: Any, path: Path | None = None, dpi: int = 80) -> bytes:
    """PNG bytes of a matplotlib figure (also written to ``path`` when given); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def png_md(png: bytes, alt: str = "plot") -> dg.MetadataValue:
    """An inline markdown image (base64 PNG) that the Dagster UI renders in the asset's metadata."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def histogram(series: Mapping[str, Sequence[float]], title: str, xlabel: str, bins: int = 30) -> Any:
    """Overlaid histograms of a few named samples (NaNs dropped)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, values in series.items():
        x = np.asarray(values, dtype=float)
        x = x[np.isfinite(x)]
        if x.size:
            ax.hist(x, bins=bins, alpha=0.5, label=f"{name} (n={x.size})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    return fig


def learning_curves(curves: Mapping[str, Mapping[str, pd.DataFrame]], title: str) -> Any:
    """A panel per metric, a line per method: ``curves[metric][method]`` has columns ``step``, ``value`` and,
    where the metric carries an interval (held-out evaluations), ``low``/``high``, drawn as a shaded band."""
    metrics = list(curves) or ["(no metric)"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for method, df in curves.get(metric, {}).items():
            if len(df):
                (line,) = ax.plot(df["step"], df["value"], marker="o", markersize=2, label=method)
                if {"low", "high"} <= set(df.columns) and df[["low", "high"]].notna().all(axis=None):
                    ax.fill_between(df["step"], df["low"], df["high"], color=line.get_color(), alpha=0.2)
        ax.set_title(metric)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig
