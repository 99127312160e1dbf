"""Asset metadata: where an output is and how long it took, loss summaries, Markdown tables."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from dagster import MetadataValue

from resources.storage import Dataset


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["seconds"]``."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - start, 2)


def dataset_metadata(ds: Dataset, seconds: float) -> dict[str, Any]:
    """Metadata every asset records: where the output is, its content hash, how long it took."""
    location = MetadataValue.url(ds.uri) if ds.uri.startswith("s3://") else MetadataValue.path(ds.uri)
    return {
        "location": location,
        "data_version": MetadataValue.text(ds.version),
        "duration_s": MetadataValue.float(seconds),
    }


def history_summary(history: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """First and last logged value of each loss term."""
    if not history:
        return {}
    terms = [k for k in ("itc", "itm", "lm") if k in history[0]]
    return {
        f"{stage}_{term}": MetadataValue.float(float(row[term]))
        for stage, row in (("first", history[0]), ("final", history[-1]))
        for term in terms
    }


def md_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of dict rows (floats with 4 significant digits)."""
    if not rows:
        return "_(empty)_"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
