"""The landing sensor: every new shard in the landing area becomes a ``web_shards`` partition.

The landing area is ``landing/web`` of the storage resource: ``DATA/landing/web/*.tar`` locally,
``s3://BUCKET/PREFIX/landing/web/*.tar`` on S3. Each evaluation lists it, adds a dynamic
partition per shard not seen before (the partition key is the shard's file name, e.g.
``00007.tar``) and requests one ingestion run of ``web_shards_job`` per new partition. The
cursor is the sorted list of shards already handled, so a shard is requested once even if its
partition is later deleted; the run key ``web_shards:<shard>`` dedups retries of a tick.
"""


import json
import os

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from assets.common import LANDING_WEB, web_shard_partitions
from assets.data import landed_shards
from orchestration.storage import StorageResource

WEB_SHARDS_JOB = "web_shards_job"
"""The job that ingests one web_shards partition (defined in orchestration.definitions)."""
MAX_RUNS_PER_TICK = 100  # more new shards are picked up by the next ticks


def _interval() -> int:
    return int(os.environ.get("BLIP_OPS_LANDING_SENSOR_INTERVAL_S", "60"))


def _default_status() -> DefaultSensorStatus:
    on = os.environ.get("BLIP_OPS_LANDING_SENSOR", "on").lower() not in ("0", "off", "false", "no")
    return DefaultSensorStatus.RUNNING if on else DefaultSensorStatus.STOPPED


@sensor(
    job_name=WEB_SHARDS_JOB,
    minimum_interval_seconds=_interval(),
    default_status=_default_status(),
    description=f"New *.tar shards in the landing area ({LANDING_WEB}) -> web_shards partitions "
                "+ one ingestion run each.",
)
def landing_sensor(context: SensorEvaluationContext, storage: StorageResource) -> SensorResult | SkipReason:
    """Add a ``web_shards`` partition per new landed shard and request its ingestion."""
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    landed = landed_shards(storage)
    new = sorted(set(landed) - seen)[:MAX_RUNS_PER_TICK]
    if not new:
        return SkipReason(f"no new shards in {storage.uri(LANDING_WEB)} ({len(landed)} landed, "
                          f"all handled)")
    known = set(context.instance.get_dynamic_partitions(web_shard_partitions.name))
    to_add = [k for k in new if k not in known]
    context.log.info(f"{len(new)} new shard(s): {', '.join(new[:10])}{' ...' if len(new) > 10 else ''}")
    return SensorResult(
        run_requests=[RunRequest(run_key=f"web_shards:{key}", partition_key=key,
                                 tags={"blip-ops/trigger": "landing_sensor"}) for key in new],
        dynamic_partitions_requests=[web_shard_partitions.build_add_request(to_add)] if to_add else [],
        cursor=json.dumps(sorted(seen | set(new))),
    )
