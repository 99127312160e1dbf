"""The landing area (where other tools put new data) and its protocol: when a landed web shard may
be read, and which content it holds.

Other tools (img2dataset, a copy, an upload) fill ``landing/web`` of the storage resource; a
shard may still be being written when it is listed: img2dataset writes ``NNNNN.tar`` under its
final name while downloading (its ``NNNNN.parquet`` is there from the start as well, its writes
reach the file in bursts, a stalled download leaves it unchanged for a while) and
``NNNNN_stats.json`` last, once both are closed.

- **Version**: a landed shard's content version is its size plus a token its rewriting changes
  (the modification time in ns locally, the ETag on S3: :meth:`StorageResource.list_stats`).
- **Ready**: a shard is complete when img2dataset's ``<stem>_stats.json`` lies beside it and is
  not older than the tar (written last, after a finished tar); otherwise it is ready once its
  version is the same on two observations in a row (two sensor ticks; the main command looks
  twice, ``settle_s`` apart) and it ends with tar's end-of-archive marker (two zero blocks,
  written on close: a download that stalls between two ticks is still not ready). Until then
  it is pending and nothing reads it.
- **Identity**: a ``web_shards`` partition is the shard's name plus its content version; the
  version a partition was ingested from is its materialization's :data:`SOURCE_VERSION`
  metadata. A re-landed shard with new content is a new version, ingested again; the same
  content is ingested once.
- **Hands off**: the pipeline never overwrites or deletes anything in the landing area; it only
  adds files where none are (:meth:`StorageResource.publish_new_files`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from resources.storage import StorageResource

LANDING_WEB = "landing/web"
"""Where new web shards land (a folder or S3 prefix); one partition per ``*.tar`` there."""
LANDING_HUMAN = "landing/human"
"""The human-annotated pairs: ``annotations.json`` (Karpathy splits) and its images."""
LANDING_TRUTH = "landing/truth"
"""Shapes world only: which web texts are noisy (read by evaluation, never by training)."""
STATS_SUFFIX = "_stats.json"
"""img2dataset's per-shard stats file, written once the shard is complete."""
TAR_END = b"\0" * 1024
"""tar's end-of-archive marker: two zero blocks, written when the archive is closed."""
SOURCE_VERSION = "source_version"
"""``web_shards`` metadata: the content version of the landed shard it was ingested from."""
SOURCE_VERSION_TAG = "blip-ops/source_version"
"""Run tag of a sensor's ingestion run: the content version it was requested for."""


@dataclass(frozen=True)
class LandedShard:
    """One ``*.tar`` of the landing area."""

    name: str  # the file name: the partition key
    version: str  # content version (see the module docstring)
    complete: bool  # its _stats.json, written after it, lies beside it


@dataclass
class Readiness:
    """Landed shards split by whether they may be read now (name -> content version)."""

    ready: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)


def landed_shards(storage: StorageResource) -> dict[str, LandedShard]:
    """The shards in the landing area by name (sorted), with their version and completeness."""
    files = storage.list_stats(LANDING_WEB)
    out = {}
    for name, st in files.items():
        if not name.endswith(".tar"):
            continue
        stats = files.get(name.removesuffix(".tar") + STATS_SUFFIX)
        out[name] = LandedShard(name, st.version, complete=stats is not None and stats.mtime >= st.mtime)
    return out


def closed_tar(storage: StorageResource, shard: LandedShard) -> bool:
    """Whether the landed tar ends with its end-of-archive marker and is still ``shard.version``."""
    key = f"{LANDING_WEB}/{shard.name}"
    if storage.read_tail(key, len(TAR_END)) != TAR_END:
        return False
    now = storage.stat(key)
    return now is not None and now.version == shard.version


def readiness(storage: StorageResource, landed: Mapping[str, LandedShard],
              previous: Mapping[str, str]) -> Readiness:
    """Which shards are ready: complete, or closed tars of the version observed the previous time.

    Args:
        landed: This observation (:func:`landed_shards`).
        previous: The versions of the shards seen pending the previous time.
    """
    out = Readiness()
    for name, shard in landed.items():
        ready = shard.complete or (previous.get(name) == shard.version and closed_tar(storage, shard))
        (out.ready if ready else out.pending)[name] = shard.version
    return out


def ready_shards(storage: StorageResource, settle_s: float = 1.0) -> Readiness:
    """The landing area's shards now, looking a second time ``settle_s`` later at those not complete."""
    first = landed_shards(storage)
    if all(s.complete for s in first.values()):
        return readiness(storage, first, {})
    time.sleep(settle_s)
    return readiness(storage, landed_shards(storage), {n: s.version for n, s in first.items()})


def source_version(storage: StorageResource, shard: str, expected: str | None = None) -> str:
    """The content version of the landed ``shard``; fails the run when it is not ``expected``.

    Ingestion calls it before reading (``expected``: the version the sensor requested, if any)
    and after (the version it started from), so content rewritten meanwhile is never recorded as
    the version read.
    """
    from dagster import Failure

    key = f"{LANDING_WEB}/{shard}"
    st = storage.stat(key)
    if st is None:
        raise Failure(f"{storage.uri(key)}: no such landed shard")
    if expected is not None and st.version != expected:
        raise Failure(f"{storage.uri(key)} is now version {st.version}, not {expected}: rewritten "
                      "since it was requested or while it was read; the landing sensor requests "
                      "the new version once it is complete")
    return st.version


def ingested_version(instance: Any, shard: str) -> str | None:
    """The landed version the latest ``web_shards`` materialization of ``shard`` was made from."""
    from dagster import AssetKey, AssetRecordsFilter

    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("web_shards"), asset_partitions=[shard]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get(SOURCE_VERSION)
    return None if value is None else str(getattr(value, "value", value))
