"""The retraining schedule: re-run the bootstrap and retraining when new shards have landed.

At each tick it compares the ``web_shards`` materialisations with the last ``bootstrapped_med``
materialisation in the instance's event log. New shards since then -> one run of
``bootstrap_job`` (pre-train, CapFilt, re-train, evaluate, promote); none -> a ``SkipReason``
saying since when. It also skips while a retraining run is queued or in progress.

Off by default (``DefaultScheduleStatus.STOPPED``): turn it on in the UI, or with
``BLIP_OPS_RETRAIN_SCHEDULE=on``. The cron comes from ``BLIP_OPS_RETRAIN_CRON`` (default ``0 3 * * *``,
daily at 03:00) in the time zone ``BLIP_OPS_RETRAIN_TZ`` (default UTC).
"""


import os
from datetime import UTC, datetime

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

RETRAIN_JOB = "bootstrap_job"
"""Everything downstream of web_shards (defined in orchestration.definitions)."""
TRAINED = AssetKey("bootstrapped_med")
SHARDS = AssetKey("web_shards")
DEFAULT_CRON = "0 3 * * *"
ACTIVE = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
          DagsterRunStatus.STARTED]


def _on(name: str, default: str) -> bool:
    return os.environ.get(name, default).lower() in ("1", "on", "true", "yes")


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def retrain_decision(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
    """A run request when shards were materialised after the last ``bootstrapped_med``."""
    instance = context.instance
    active = instance.get_run_records(RunsFilter(job_name=RETRAIN_JOB, statuses=ACTIVE), limit=1)
    if active:
        return SkipReason(f"a retraining run is already in progress ({active[0].dagster_run.run_id})")
    trained = instance.fetch_materializations(TRAINED, limit=1).records
    after = trained[0].storage_id if trained else None
    new = instance.fetch_materializations(AssetRecordsFilter(asset_key=SHARDS, after_storage_id=after),
                                          limit=10_000).records
    if not new:
        if trained:
            return SkipReason(f"no new shards since the last bootstrapped_med materialization "
                              f"({_when(trained[0].timestamp)})")
        return SkipReason("no web shards have been ingested yet")
    shards = sorted({r.partition_key for r in new if r.partition_key})
    latest = max(r.storage_id for r in new)
    tick = context.scheduled_execution_time
    stamp = tick.strftime("%Y%m%dT%H%M") if tick else "manual"
    since = f"since {_when(trained[0].timestamp)}" if trained else "(first training)"
    context.log.info(f"{len(shards)} new shard(s) {since}: {', '.join(shards[:10])}")
    return RunRequest(
        run_key=f"retrain:{latest}:{stamp}",  # a failed run is retried at the next tick
        tags={"blip-ops/trigger": "retrain_schedule", "blip-ops/new_shards": str(len(shards)),
              "blip-ops/latest_shard_event": str(latest)},
    )


def build_retrain_schedule(cron: str | None = None, timezone: str | None = None,
                           running: bool | None = None) -> ScheduleDefinition:
    """The schedule with a given cron / time zone / default status (env defaults otherwise)."""

    @schedule(
        name="retrain_schedule",
        cron_schedule=cron or os.environ.get("BLIP_OPS_RETRAIN_CRON", DEFAULT_CRON),
        execution_timezone=timezone or os.environ.get("BLIP_OPS_RETRAIN_TZ", "UTC"),
        job_name=RETRAIN_JOB,
        default_status=(DefaultScheduleStatus.RUNNING
                        if (running if running is not None else _on("BLIP_OPS_RETRAIN_SCHEDULE", "off"))
                        else DefaultScheduleStatus.STOPPED),
        description="Re-run the bootstrap and retraining when new web shards landed since the last "
                    "bootstrapped_med; skip with the reason otherwise.",
    )
    def _retrain(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
        return retrain_decision(context)

    return _retrain


retrain_schedule = build_retrain_schedule()
