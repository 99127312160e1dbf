"""CapFilt: synthetic captions for the web images, then the filtered, bootstrapped corpus."""


from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.checks import ShardPolicy, select_shards
from assets.keys import GROUP, IO_MANAGER_KEY
from assets.metadata import dataset_metadata, md_table, stopwatch
from assets.models import RECIPE
from assets.plots import bar_plot
from assets.publishing import code_version, identity, publish, read_json, reusable, staging
from assets.tools import Tools
from blip_core.capfilt import CapfiltConfig, describe_threshold
from blip_core.recipe import Recipe
from resources.dvc import DVC_POOL, DvcResource
from resources.landing import LANDING_TRUTH
from resources.storage import Dataset, StorageResource

_CAPFILT = RECIPE.capfilt


class CaptionSettings(Config):
    """How synthetic captions are generated (defaults: the recipe's)."""

    method: str = Field(default=_CAPFILT.method, description="nucleus, beam or greedy")
    top_p: float = Field(default=_CAPFILT.top_p, description="nucleus sampling mass")
    num_beams: int = Field(default=_CAPFILT.num_beams, description="beam search width")
    num_captions: int = Field(default=_CAPFILT.num_captions, description="captions per web image")
    max_length: int = Field(default=_CAPFILT.max_length, description="generated tokens at most")
    min_length: int = Field(default=_CAPFILT.min_length, description="generated tokens at least")
    batch_size: int = Field(default=_CAPFILT.batch_size, description="images per forward")
    seed: int = Field(default=RECIPE.seed, description="seeds nucleus sampling")
    device: str = Field(default=RECIPE.device, description="cpu, cuda or auto (cuda when available)")

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Self:
        """The settings of ``recipe``."""
        return cls(**_fields(recipe.capfilt_config(), cls))

    def to_capfilt(self) -> CapfiltConfig:
        """The blip_core configuration."""
        return replace(RECIPE.capfilt_config(), method=self.method, top_p=self.top_p,  # type: ignore[arg-type]
                       num_beams=self.num_beams, num_captions=self.num_captions,
                       max_length=self.max_length, min_length=self.min_length,
                       batch_size=self.batch_size, seed=self.seed, device=self.device)


class CorpusSettings(Config):
    """How texts are filtered into the bootstrapped corpus (defaults: the recipe's)."""

    threshold: float | None = Field(
        default=_CAPFILT.threshold,
        description="a text is noisy when its ITM match probability is below this; empty: "
                    "calibrated (see calibration); the paper's argmax rule is 0.5")
    calibration: str = Field(
        default=_CAPFILT.calibration,
        description="how an empty threshold is calibrated: web = Otsu's cut of the web texts' own "
                    "scores (label-free; falls back to human when they show no two modes), human = "
                    "Youden's J on calibration_split")
    calibration_split: str = Field(default=_CAPFILT.calibration_split,
                                   description="human split of the 'human' calibration")
    use_synthetic: bool = Field(
        default=_CAPFILT.use_synthetic,
        description="put the synthetic captions the filter keeps into the corpus (the paper's C + F); "
                    "off in the CPU recipe, whose tiny captioner names colours but not shapes: they "
                    "are still scored and reported (synthetic_kept_wrong_ratio)")
    batch_size: int = Field(default=_CAPFILT.batch_size, description="images per forward")
    shard_size: int = Field(default=_CAPFILT.shard_size, description="samples per corpus shard")
    device: str = Field(default=RECIPE.device, description="cpu, cuda or auto (cuda when available)")

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Self:
        """The settings of ``recipe``."""
        return cls(**_fields(recipe.capfilt_config(), cls))

    def to_capfilt(self) -> CapfiltConfig:
        """The blip_core configuration."""
        if self.calibration not in ("web", "human"):
            raise ValueError(f"calibration must be web or human, not {self.calibration!r}")
        return replace(RECIPE.capfilt_config(), threshold=self.threshold,  # type: ignore[arg-type]
                       calibration=self.calibration, calibration_split=self.calibration_split,
                       use_synthetic=self.use_synthetic, batch_size=self.batch_size,
                       shard_size=self.shard_size, device=self.device)


def _fields(source: Any, settings: type[Config]) -> dict[str, Any]:
    """The attributes of ``source`` that ``settings`` has fields for."""
    return {name: getattr(source, name) for name in settings.model_fields}


def _web_dirs(stack: ExitStack, storage: StorageResource, web_shards: dict[str, Dataset]) -> list[str]:
    return [str(stack.enter_context(storage.local_dir(ds.key))) for _, ds in sorted(web_shards.items())]


@asset(group_name=GROUP, pool=DVC_POOL, io_manager_key=IO_MANAGER_KEY, code_version=code_version("1"),
       kinds={"pytorch"}, description="Synthetic captions of every web image, sampled from the captioner.")
def synthetic_captions(context: AssetExecutionContext, config: CaptionSettings, storage: StorageResource,
                       dvc: DvcResource, shard_policy: ShardPolicy, captioner: Dataset,
                       web_shards: dict[str, Dataset]) -> MaterializeResult[Dataset]:
    """Caption the web images (nucleus sampling by default)."""
    from blip_core.capfilt import caption_web, read_synthetic

    web_shards = select_shards(context, shard_policy, web_shards).used
    ident = identity(context, config, {"captioner": captioner, **_web_inputs(web_shards)})
    with ExitStack() as stack, stopwatch() as t:
        ds = reusable(context, storage, "synthetic_captions", ident)
        reused = ds is not None
        if ds is None:
            model = stack.enter_context(storage.local_dir(captioner.key))
            web = _web_dirs(stack, storage, web_shards)
            tmp = stack.enter_context(staging(storage))
            caption_web([str(model)], web, tmp / "out", config.to_capfilt(), progress=False)
            ds = publish(storage, "synthetic_captions", tmp / "out", identity=ident)
        versioned = Tools(storage, dvc=dvc).dvc_metadata(ds, reused=reused)
        folder = stack.enter_context(storage.local_dir(ds.key))
        manifest = read_json(folder / "manifest.json")
        examples = list(read_synthetic(folder).items())[:8]
    rows = [{"key": k, "caption": " / ".join(c)} for k, c in examples]
    return MaterializeResult(value=ds, data_version=DataVersion(ds.version), metadata={
        **dataset_metadata(ds, t["seconds"]),
        "images": MetadataValue.int(manifest["images"]),
        "captions": MetadataValue.int(manifest["captions"]),
        "dagster/row_count": MetadataValue.int(manifest["captions"]),
        "generation_seconds": MetadataValue.float(float(manifest["seconds"])),
        "tokens_per_second": MetadataValue.float(float(manifest["tokens_per_second"])),
        "method": config.method,
        "examples": MetadataValue.md(md_table(rows)),
        "reused": MetadataValue.bool(reused),
        **versioned,
    })


@asset(group_name=GROUP, pool=DVC_POOL, io_manager_key=IO_MANAGER_KEY, code_version=code_version("3"),
       kinds={"pytorch", "webdataset"},
       description="Human train pairs + web texts kept by the filter + synthetic captions kept by it.")
def bootstrapped_corpus(context: AssetExecutionContext, config: CorpusSettings, storage: StorageResource,
                        dvc: DvcResource, shard_policy: ShardPolicy, filter: Dataset,
                        web_shards: dict[str, Dataset],
                        synthetic_captions: Dataset, human_pairs: Dataset) -> MaterializeResult[Dataset]:
    """Score every web text and synthetic caption with the filter and keep those that match."""
    from blip_core.capfilt import build_corpus

    web_shards = select_shards(context, shard_policy, web_shards).used
    inputs = {"filter": filter, "synthetic_captions": synthetic_captions, "human_pairs": human_pairs,
              **_web_inputs(web_shards)}
    ident = identity(context, config, inputs)
    with ExitStack() as stack, stopwatch() as t:
        ds = reusable(context, storage, "bootstrapped_corpus", ident)
        reused = ds is not None
        if ds is None:
            model = stack.enter_context(storage.local_dir(filter.key))
            web = _web_dirs(stack, storage, web_shards)
            synthetic = stack.enter_context(storage.local_dir(synthetic_captions.key))
            human = stack.enter_context(storage.local_dir(human_pairs.key))
            tmp = stack.enter_context(staging(storage))
            build_corpus([str(model)], web, synthetic, human / "annotations.json", tmp / "out",
                         config.to_capfilt(), progress=False)
            ds = publish(storage, "bootstrapped_corpus", tmp / "out", identity=ident)
        versioned = Tools(storage, dvc=dvc).dvc_metadata(ds, reused=reused)
        folder = stack.enter_context(storage.local_dir(ds.key))
        manifest = read_json(folder / "manifest.json")
        quality = measure_filter(storage, folder)
    counts, noise = manifest["counts"], manifest["noise_ratio"]
    per_source = [{"source": s, "kept": counts[f"{s}_kept"], "removed": counts[f"{s}_removed"],
                   "noise_ratio": round(noise[s], 4)} for s in ("web", "synthetic")]
    per_source.append({"source": "human", "kept": counts["human"], "removed": 0, "noise_ratio": 0.0})
    metadata: dict[str, Any] = {
        **dataset_metadata(ds, t["seconds"]),
        "samples": MetadataValue.int(manifest["total"]),
        "use_synthetic": MetadataValue.bool(bool(manifest.get("use_synthetic", True))),
        "dagster/row_count": MetadataValue.int(manifest["total"]),
        "threshold": MetadataValue.float(float(manifest["threshold"])),
        "threshold_source": MetadataValue.text(describe_threshold(manifest.get("calibration"))),
        "web_noise_ratio": MetadataValue.float(round(noise["web"], 4)),
        "synthetic_noise_ratio": MetadataValue.float(round(noise["synthetic"], 4)),
        "counts": MetadataValue.json(counts),
        "kept_removed_per_source": MetadataValue.md(md_table(per_source)),
        "noise_ratios": MetadataValue.md(bar_plot(
            {"web": noise["web"], "synthetic": noise["synthetic"]},
            "texts removed by the filter", "share removed", ylim=(0.0, 1.0))),
        "reused": MetadataValue.bool(reused),
        **versioned,
    }
    if quality is not None:
        metadata["filter_precision"] = MetadataValue.float(round(quality["precision"], 4))
        metadata["filter_recall"] = MetadataValue.float(round(quality["recall"], 4))
        # synthetic captions the filter kept that are wrong for their image (the world's truth)
        metadata["synthetic_kept_wrong_ratio"] = MetadataValue.float(
            round(quality["synthetic_kept_wrong_ratio"], 4))
    return MaterializeResult(value=ds, data_version=DataVersion(ds.version), metadata=metadata)


def _web_inputs(web_shards: dict[str, Dataset]) -> dict[str, Dataset]:
    return {f"web_shards[{pk}]": ds for pk, ds in web_shards.items()}


def measure_filter(storage: StorageResource, corpus: Path) -> dict[str, float] | None:
    """Filter precision/recall on web texts against the landing area's truth (shapes world only)."""
    from blip_core.capfilt import filter_quality

    if "web_truth.jsonl" not in storage.list_files(LANDING_TRUTH, suffix=".jsonl"):
        return None
    with storage.local_file(f"{LANDING_TRUTH}/web_truth.jsonl") as truth:
        return filter_quality(corpus, truth)

