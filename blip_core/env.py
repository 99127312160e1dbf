"""Environment defaults of every process we start: offline hubs, no telemetry."""

from __future__ import annotations

import os

OFFLINE_QUIET: dict[str, str] = {
    # nothing is fetched from a model or data hub at run time
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    # no usage reporting from the tools we drive
    "DAGSTER_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
}
"""Set in every process unless the environment says otherwise."""


def set_defaults(extra: dict[str, str] | None = None) -> None:
    """``os.environ.setdefault`` for :data:`OFFLINE_QUIET` and ``extra``."""
    for key, value in {**OFFLINE_QUIET, **(extra or {})}.items():
        os.environ.setdefault(key, value)
