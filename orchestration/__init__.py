"""Orchestration of the BLIP lineage: Dagster definitions, resources, the main command and the UI."""

from __future__ import annotations

import os

for _key, _value in (("DAGSTER_DISABLE_TELEMETRY", "true"), ("GX_ANALYTICS_ENABLED", "false"),
                     ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_key, _value)
