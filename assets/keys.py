"""Names the asset definitions share: their group, their IO manager's key, the web shards' partitions."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition

GROUP = "blip"
IO_MANAGER_KEY = "datasets_io"

web_shard_partitions = DynamicPartitionsDefinition(name="web_shards")
