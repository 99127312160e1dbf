"""The landing sensor: every complete shard in the landing area becomes a ``web_shards`` partition.

The landing area is ``landing/web`` of the storage resource: ``DATA/landing/web/*.tar`` locally,
``s3://BUCKET/PREFIX/landing/web/*.tar`` on S3. It follows the landing protocol
(:mod:`resources.landing`): each evaluation lists the shards with their content version and
requests only those that are ready (img2dataset's ``_stats.json`` beside them, or the same
version as on the previous tick and closed by tar's end-of-archive marker), so a shard still
being written is never read. For each ready shard whose version it has not requested yet it
adds the dynamic partition (the partition key is the shard's file name, e.g. ``00007.tar``) and
requests one ingestion run of ``web_shards_job``, run key ``web_shards:<shard>:<version>``:
Dagster dedups retries of the same content, a re-landed shard with new content is requested
again. A shard whose latest materialization was made from the same version (``source_version``
metadata, e.g. by the main command) is not requested.

The cursor is JSON ``{"requested": {shard: version}, "pending": {shard: version}}``: what was
requested (kept when a shard is later removed) and what was seen not yet ready. The older cursor,
a list of names, is read as "requested at whatever version is landed now".
"""


import json
import os
from typing import Any

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from assets.keys import web_shard_partitions
from resources.landing import LANDING_WEB, SOURCE_VERSION_TAG, ingested_version, landed_shards, readiness
from resources.storage import StorageResource

WEB_SHARDS_JOB = "web_shards_job"
"""The job that ingests one web_shards partition (defined in orchestration.definitions)."""
MAX_RUNS_PER_TICK = 100  # more ready shards are picked up by the next ticks


def _interval() -> int:
    return int(os.environ.get("BLIP_OPS_LANDING_SENSOR_INTERVAL_S", "60"))


def _default_status() -> DefaultSensorStatus:
    on = os.environ.get("BLIP_OPS_LANDING_SENSOR", "on").lower() not in ("0", "off", "false", "no")
    return DefaultSensorStatus.RUNNING if on else DefaultSensorStatus.STOPPED


def parse_cursor(cursor: str | None) -> tuple[dict[str, str | None], dict[str, str]]:
    """``(requested, pending)`` of a cursor; a version None: requested by an older sensor."""
    if not cursor:
        return {}, {}
    doc: Any = json.loads(cursor)
    if isinstance(doc, list):
        return dict.fromkeys(doc), {}
    return dict(doc.get("requested", {})), dict(doc.get("pending", {}))


@sensor(
    job_name=WEB_SHARDS_JOB,
    minimum_interval_seconds=_interval(),
    default_status=_default_status(),
    description=f"Complete *.tar shards in the landing area ({LANDING_WEB}), new or re-landed with "
                "new content -> web_shards partitions + one ingestion run each.",
)
def landing_sensor(context: SensorEvaluationContext, storage: StorageResource) -> SensorResult:
    """Add a ``web_shards`` partition per ready, not yet ingested shard version and request its ingestion."""
    requested, pending = parse_cursor(context.cursor)
    landed = landed_shards(storage)
    for name, shard in landed.items():
        if name in requested and requested[name] is None:  # an older cursor's: adopt what is there
            requested[name] = shard.version
    todo = {name: shard for name, shard in landed.items() if requested.get(name) != shard.version}
    state = readiness(storage, todo, pending)
    waiting = f"; waiting for {len(state.pending)} still being written" if state.pending else ""
    new: dict[str, str] = {}
    for name, version in state.ready.items():
        if len(new) >= MAX_RUNS_PER_TICK:  # the next ticks pick it up: still ready then
            state.pending[name] = version
        elif ingested_version(context.instance, name) == version:
            requested[name] = version  # already ingested from this content (e.g. by the main command)
        else:
            new[name] = version
    requested.update(new)
    cursor = json.dumps({"requested": dict(sorted(requested.items())),
                         "pending": dict(sorted(state.pending.items()))})
    if not new:  # the cursor still moves: pending observations, versions found ingested
        return SensorResult(cursor=cursor, skip_reason=f"no new shard version ready in "
                            f"{storage.uri(LANDING_WEB)} ({len(landed)} landed{waiting})")
    known = set(context.instance.get_dynamic_partitions(web_shard_partitions.name))
    to_add = [k for k in new if k not in known]
    names = list(new)
    context.log.info(f"{len(new)} shard version(s) to ingest: {', '.join(names[:10])}"
                     f"{' ...' if len(new) > 10 else ''}{waiting}")
    return SensorResult(
        run_requests=[RunRequest(run_key=f"web_shards:{key}:{version}", partition_key=key,
                                 tags={"blip-ops/trigger": "landing_sensor", SOURCE_VERSION_TAG: version})
                      for key, version in new.items()],
        dynamic_partitions_requests=[web_shard_partitions.build_add_request(to_add)] if to_add else [],
        cursor=cursor,
    )
