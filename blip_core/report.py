"""``report.json``: the baseline against the bootstrapped model, and what CapFilt did.

One layout, written by ``blip-core bootstrap`` and by the ``downstream_evals`` asset, and read by
the summaries of both.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blip_core.io import atomic_write_json, atomic_write_text

REPORT_METRICS = ("tr@1", "tr@5", "ir@1", "ir@5", "bleu4", "cider")
"""The metrics a report keeps per model (percent; BLEU-4 and CIDEr x100)."""


def write_comparison(results: Mapping[str, Mapping[str, float]], out: str | Path,
                     **context: Any) -> str:
    """Writes ``metrics.json`` (``{"metrics": results, **context}``), ``comparison.md`` and
    ``comparison.png`` to ``out``; returns the Markdown table (deltas against the first model)."""
    from blip_core.evaluate import compare_plot, compare_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = compare_table(dict(results))
    atomic_write_json(out / "metrics.json", {**context, "metrics": results})
    atomic_write_text(out / "comparison.md", table)
    compare_plot(dict(results), out / "comparison.png")
    return table


def build_report(results: Mapping[str, Mapping[str, float]], manifest: Mapping[str, Any],
                 quality: Mapping[str, float] | None, **extra: Any) -> dict[str, Any]:
    """The report of an evaluation of ``baseline`` and ``bootstrapped`` (keys of ``results``).

    Args:
        manifest: the bootstrapped corpus's ``manifest.json``.
        quality: ``blip_core.capfilt.filter_quality`` against the world's truth, when known.
        extra: added as they are (checkpoints, versions, timings).
    """
    counts = manifest["counts"]
    quality = quality or {}
    return {
        **{name: {k: float(results[name][k]) for k in REPORT_METRICS}
           for name in ("baseline", "bootstrapped")},
        "filter": {**{k: quality[k] for k in ("precision", "recall") if k in quality},
                   "threshold": manifest["threshold"], "calibration": manifest.get("calibration")},
        "corpus": {k: counts[k] for k in ("human", "web_kept", "web_removed", "synthetic_kept",
                                          "synthetic_removed")}
        | {"use_synthetic": manifest.get("use_synthetic", True)},
        "noise_ratio": manifest["noise_ratio"],
        # synthetic captions true of their image (the world's truth), by the filter's decision
        "synthetic": {k.removeprefix("synthetic_"): v for k, v in quality.items()
                      if k.startswith("synthetic_")},
        **extra,
    }


def beats(report: Mapping[str, Any]) -> bool:
    """Whether the bootstrapped model is better on retrieval R@1 (TR + IR) and on CIDEr."""
    r1 = sum(report["bootstrapped"][k] - report["baseline"][k] for k in ("tr@1", "ir@1"))
    return r1 > 0 and report["bootstrapped"]["cider"] > report["baseline"]["cider"]


def report_table(report: Mapping[str, Any]) -> str:
    """The baseline and the bootstrapped model's metrics, with deltas, as a Markdown table."""
    from blip_core.evaluate import compare_table

    return compare_table({"baseline": report["baseline"], "bootstrapped": report["bootstrapped"]})


def capfilt_lines(report: Mapping[str, Any]) -> list[str]:
    """What CapFilt did (noise ratios, threshold, corpus, filter quality), one line each."""
    from blip_core.capfilt import describe_threshold

    f, c, noise = report["filter"], report["corpus"], report["noise_ratio"]
    threshold = f"threshold {f['threshold']:.4f}: {describe_threshold(f.get('calibration'))}"
    lines = [
        f"noise ratio (share removed by the filter): web {noise['web']:.3f}, synthetic "
        f"{noise['synthetic']:.3f} ({threshold})",
        f"corpus: human {c['human']}, web kept {c['web_kept']} / removed {c['web_removed']}, synthetic "
        f"kept {c['synthetic_kept']} / removed {c['synthetic_removed']}"
        f"{'' if c.get('use_synthetic', True) else ' (not put in the corpus)'}",
    ]
    if "precision" in f:
        lines.append(f"filter vs the world's truth: precision {f['precision']:.3f}, recall {f['recall']:.3f}")
    if s := report.get("synthetic"):
        lines.append(f"synthetic captions kept: {s['kept_correct']} true of their image, "
                     f"{s['kept_wrong']} wrong ({s['kept_wrong_ratio']:.0%})")
    return lines
