"""Dagster assets and asset checks of the BLIP lineage, thin over blip_core."""

from __future__ import annotations

from blip_core.env import set_defaults

set_defaults()

from assets.capfilt import bootstrapped_corpus, synthetic_captions  # noqa: E402
from assets.checks import ALL_CHECKS  # noqa: E402
from assets.data import human_pairs, web_shards  # noqa: E402
from assets.evals import downstream_evals  # noqa: E402
from assets.models import bootstrapped_med, captioner, filter_model, pretrained_med  # noqa: E402

ALL_ASSETS = [web_shards, human_pairs, pretrained_med, captioner, filter_model, synthetic_captions,
              bootstrapped_corpus, bootstrapped_med, downstream_evals]

__all__ = ["ALL_ASSETS", "ALL_CHECKS"]
