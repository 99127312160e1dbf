"""Orchestration of the BLIP lineage: Dagster definitions, resources, the main command and the UI."""

from __future__ import annotations

from blip_core.env import set_defaults

set_defaults({
    # MLflow prints "View run at <tracking URI>" (password included) to stdout, which Dagster
    # captures into the run's logs: the asset metadata has the link.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # MLflow client HTTP: a refused request fails in ~3 s, not after MLflow's ~4 minutes of
    # retries (TrackedRun does the waiting, with backoff).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
})
