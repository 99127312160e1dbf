"""Plots as inline Markdown images (the Dagster UI shows them in the asset's metadata)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def png_markdown(fig: Any, alt: str) -> str:
    """A matplotlib figure as an inline Markdown image (shown by the Dagster UI)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def png_file_markdown(path: Path, alt: str) -> str:
    """A PNG file as an inline Markdown image."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


def _figure(width: float = 6.0, height: float = 3.2) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def loss_plot(history: Sequence[Mapping[str, float]], title: str) -> str:
    """Loss curves (every ``itc``/``itm``/``lm`` term logged) as Markdown."""
    fig, ax = _figure()
    steps = [row["step"] for row in history]
    for term in ("loss", "itc", "itm", "lm"):
        if history and term in history[0]:
            marker = "." if len(steps) < 20 else None
            ax.plot(steps, [row[term] for row in history], label=term, marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return png_markdown(fig, f"{title} loss")


def bar_plot(values: Mapping[str, float], title: str, ylabel: str, ylim: tuple[float, float] | None = None,
             band: tuple[float, float] | None = None) -> str:
    """A labelled bar chart as Markdown; ``band`` draws the accepted range."""
    fig, ax = _figure(5.0, 3.0)
    names = list(values)
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]
    bars = ax.bar(names, [values[n] for n in names], color=colors[: len(names)])
    ax.bar_label(bars, fmt="%.3g")
    if band is not None:
        ax.axhspan(band[0], band[1], color="green", alpha=0.08, label="accepted band")
        ax.legend(loc="upper right")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return png_markdown(fig, title)
