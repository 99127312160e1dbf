"""Incoming data: validated web shards (one partition per landed shard) and the human pairs."""



from contextlib import ExitStack

from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.keys import GROUP, IO_MANAGER_KEY, web_shard_partitions
from assets.metadata import dataset_metadata, md_table, stopwatch
from assets.plots import bar_plot
from assets.publishing import code_version, publish, read_json, staging
from assets.tools import Tools
from blip_core.data.ingest import DEFAULT_CONFIG, IngestConfig
from resources.dvc import DVC_POOL, DvcResource
from resources.landing import (
    LANDING_HUMAN,
    LANDING_WEB,
    SOURCE_VERSION,
    SOURCE_VERSION_TAG,
    source_version,
)
from resources.storage import Dataset, StorageResource


class IngestSettings(Config):
    """Per-sample limits of ``blip_core.data.ingest.IngestConfig`` (defaults: the same)."""

    max_caption_chars: int = Field(default=DEFAULT_CONFIG.max_caption_chars,
                                   description="longer captions are quarantined")
    min_side: int = Field(default=DEFAULT_CONFIG.min_side,
                          description="images with a shorter side are quarantined")
    max_pixels: int = Field(default=DEFAULT_CONFIG.max_pixels, description="larger images are quarantined")

    def to_ingest_config(self) -> IngestConfig:
        return IngestConfig(max_caption_chars=self.max_caption_chars, min_side=self.min_side,
                            max_pixels=self.max_pixels)


def _reason_metadata(stats: dict) -> dict:
    rows = [{"reason": r, "samples": n} for r, n in stats.get("by_reason", {}).items()]
    return {"quarantined_by_reason": MetadataValue.md(md_table(rows) if rows else "_none_")}


@asset(
    group_name=GROUP,
    pool=DVC_POOL,
    partitions_def=web_shard_partitions,
    io_manager_key=IO_MANAGER_KEY,
    code_version=code_version("1"),
    kinds={"python", "webdataset"},
    description="One landed web shard, validated: good pairs re-written, bad ones quarantined.",
)
def web_shards(context: AssetExecutionContext, config: IngestSettings, storage: StorageResource,
               dvc: DvcResource) -> MaterializeResult[Dataset]:
    """Ingest the landing area's shard named by the partition key, recording the version read.

    A run the landing sensor requested fails, reading nothing, when the shard is no longer the
    version it was requested for (``resources.landing``); any run fails when it changes
    while read.
    """
    from blip_core.data.ingest import ingest, quarantine_ratio

    shard = context.partition_key
    version = source_version(storage, shard, context.run.tags.get(SOURCE_VERSION_TAG))
    parquet = shard.removesuffix(".tar") + ".parquet"  # the producer's columns and listing
    with stopwatch() as t, ExitStack() as stack:
        tmp = stack.enter_context(staging(storage))
        (tmp / "src").mkdir()
        for name in [shard, *([parquet] if parquet in storage.list_files(LANDING_WEB, ".parquet") else [])]:
            (tmp / "src" / name).symlink_to(stack.enter_context(storage.local_file(f"{LANDING_WEB}/{name}")))
        stats = ingest(tmp / "src" / shard, tmp / "out", config.to_ingest_config()).to_json()
        source_version(storage, shard, version)  # unchanged while read
        ds = publish(storage, "web_shards", tmp / "out", partition=shard)
        versioned = Tools(storage, dvc=dvc).dvc_metadata(ds)
    ratio = quarantine_ratio(stats)
    return MaterializeResult(value=ds, data_version=DataVersion(ds.version), metadata={
        **dataset_metadata(ds, t["seconds"]),
        "source": storage.uri(f"{LANDING_WEB}/{shard}"),
        SOURCE_VERSION: MetadataValue.text(version),
        "kept": MetadataValue.int(stats["kept"]),
        "quarantined": MetadataValue.int(stats["quarantined"]),
        "quarantine_ratio": MetadataValue.float(round(ratio, 4)),
        "dagster/row_count": MetadataValue.int(stats["kept"]),
        **_reason_metadata(stats),
        **versioned,
    })


@asset(
    group_name=GROUP,
    pool=DVC_POOL,
    io_manager_key=IO_MANAGER_KEY,
    code_version=code_version("1"),
    kinds={"python", "json"},
    description="Human-annotated pairs (COCO Karpathy splits), validated; bad images quarantined.",
)
def human_pairs(context: AssetExecutionContext, config: IngestSettings, storage: StorageResource,
                dvc: DvcResource) -> MaterializeResult[Dataset]:
    """Ingest the landing area's ``annotations.json`` and its images."""
    from blip_core.data.ingest import ingest_human

    with stopwatch() as t, storage.local_dir(LANDING_HUMAN, complete_only=False) as src, \
            staging(storage) as tmp:
        stats = ingest_human(src / "annotations.json", src, tmp / "out",
                             config.to_ingest_config()).to_json()
        images = read_json(tmp / "out" / "annotations.json")
        ds = publish(storage, "human_pairs", tmp / "out")
        versioned = Tools(storage, dvc=dvc).dvc_metadata(ds)
    per_split = {s: sum(im["split"] == s for im in images) for s in ("train", "val", "test")}
    captions = {s: sum(len(im["caption"]) for im in images if im["split"] == s) for s in per_split}
    context.log.info(f"human pairs: {per_split} images, {sum(captions.values())} captions")
    return MaterializeResult(value=ds, data_version=DataVersion(ds.version), metadata={
        **dataset_metadata(ds, t["seconds"]),
        "source": storage.uri(LANDING_HUMAN),
        "images": MetadataValue.int(stats["kept"]),
        "captions": MetadataValue.int(sum(captions.values())),
        "images_per_split": MetadataValue.json(per_split),
        "captions_per_split": MetadataValue.json(captions),
        "quarantined": MetadataValue.int(stats["quarantined"]),
        "captions_dropped": MetadataValue.json(stats.get("captions_dropped", {})),
        "dagster/row_count": MetadataValue.int(stats["kept"]),
        "splits": MetadataValue.md(bar_plot({k: float(v) for k, v in per_split.items()},
                                            "images per split", "images")),
        **_reason_metadata(stats),
        **versioned,
    })
