"""Small helpers that turn tables and plots into Dagster metadata (markdown previews, inline PNGs)."""

from __future__ import annotations

import base64
import io
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
