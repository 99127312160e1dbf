"""Data: the embedded shapes world, shard and Karpathy formats, ingest, torch datasets.

``blip_core.data.dataset`` (torch) is imported lazily so that generating or ingesting data
does not pay for importing torch. The ``ingest`` function is not re-exported here: its name
is the ``blip_core.data.ingest`` module's (use ``from blip_core.data.ingest import ingest``).
"""

from __future__ import annotations

from typing import Any

from blip_core.data.formats import (
    HumanImage,
    RawSample,
    Rejection,
    Sample,
    iter_shard,
    list_shards,
    read_karpathy,
    write_karpathy,
    write_shards,
)
from blip_core.data.ingest import REASONS, IngestConfig, IngestStats, ingest_human
from blip_core.data.shapes import Scene, WorldConfig, describe, generate_world, is_correct, render

_LAZY = {"ImageTextDataset", "ImageCaptionsSplit", "ImageOnlyDataset", "image_transform"}

__all__ = [
    "REASONS",
    "HumanImage",
    "IngestConfig",
    "IngestStats",
    "RawSample",
    "Rejection",
    "Sample",
    "Scene",
    "WorldConfig",
    "describe",
    "generate_world",
    "ingest_human",
    "is_correct",
    "iter_shard",
    "list_shards",
    "read_karpathy",
    "render",
    "write_karpathy",
    "write_shards",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from blip_core.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
