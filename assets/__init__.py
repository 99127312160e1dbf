"""Dagster assets and asset checks of the BLIP lineage, thin over blip_core."""

from __future__ import annotations

import resources  # noqa: F401  (the environment defaults, before Dagster and MLflow load)
from assets.capfilt import bootstrapped_corpus, synthetic_captions
from assets.checks import ALL_CHECKS
from assets.data import human_pairs, web_shards
from assets.evals import downstream_evals
from assets.models import bootstrapped_med, captioner, filter_model, pretrained_med
from assets.promotion import registered_model

ALL_ASSETS = [web_shards, human_pairs, pretrained_med, captioner, filter_model, synthetic_captions,
              bootstrapped_corpus, bootstrapped_med, downstream_evals, registered_model]

__all__ = ["ALL_ASSETS", "ALL_CHECKS"]
