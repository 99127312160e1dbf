"""The pipeline's Dagster resources (storage, MLflow, DVC, training launchers), over blip_core.

Importing the package sets the process's environment defaults (an explicit setting wins) before
Dagster, MLflow or Great Expectations load: telemetry off, models offline, and short MLflow
client HTTP retries.
"""

from __future__ import annotations

import os

ENV_DEFAULTS = {
    "DAGSTER_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # MLflow prints "View run at <tracking URI>" (password included) to stdout, which Dagster
    # captures into the run's logs: the asset metadata has the link.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # MLflow client HTTP: a refused request fails in ~3 s, not after MLflow's ~4 minutes of
    # retries (TrackedRun does the waiting, with backoff).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
"""Environment defaults of every process that uses the resources."""

for _key, _value in ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
