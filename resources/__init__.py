"""The pipeline's Dagster resources (storage, MLflow, DVC, training launchers), over blip_core.

Importing the package sets the process's environment defaults (an explicit setting wins) before
Dagster, MLflow or Great Expectations load: ``blip_core.env``'s (telemetry off, models offline)
and short MLflow client HTTP retries.
"""

from __future__ import annotations

from blip_core.env import set_defaults

set_defaults({
    # MLflow prints "View run at <tracking URI>" (password included) to stdout, which Dagster
    # captures into the run's logs: the asset metadata has the link.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # MLflow client HTTP: a refused request fails in ~3 s, not after MLflow's ~4 minutes of
    # retries (TrackedRun does the waiting, with backoff).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
})
