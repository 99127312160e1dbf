"""Orchestration of the BLIP lineage: Dagster definitions, jobs, schedules, sensors, the main command,
the UI and the promotion command."""

from __future__ import annotations

import resources  # noqa: F401  (the environment defaults, before Dagster and MLflow load)
