"""Dagster assets and asset checks of the BLIP lineage, thin over blip_core."""

from __future__ import annotations

import os

for _key, _value in (("GX_ANALYTICS_ENABLED", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                     ("DAGSTER_DISABLE_TELEMETRY", "true"), ("HF_HUB_OFFLINE", "1"),
                     ("TRANSFORMERS_OFFLINE", "1")):
    os.environ.setdefault(_key, _value)

from assets.capfilt import bootstrapped_corpus, synthetic_captions  # noqa: E402
from assets.checks import ALL_CHECKS  # noqa: E402
from assets.data import human_pairs, web_shards  # noqa: E402
from assets.evals import downstream_evals  # noqa: E402
from assets.models import bootstrapped_med, captioner, filter_model, pretrained_med  # noqa: E402

ALL_ASSETS = [web_shards, human_pairs, pretrained_med, captioner, filter_model, synthetic_captions,
              bootstrapped_corpus, bootstrapped_med, downstream_evals]

__all__ = ["ALL_ASSETS", "ALL_CHECKS"]
