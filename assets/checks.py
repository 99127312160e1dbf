"""Blocking data-quality checks, evaluated with Great Expectations 1.x.

Each check states one invariant and returns its observed values as metadata. They are
blocking: in a run, a failed check stops every asset downstream of the checked one; across
runs, the assets that read web shards leave out those whose latest checks did not pass
(:func:`select_shards`, per the :class:`ShardPolicy` resource) and ``bootstrapped_med``
refuses a corpus whose latest checks did not pass (:func:`require_passed_checks`), as does the
promotion of ``registered_model``; all of them read the results with :func:`check_problems`.
``dagster-ge`` does not support GX 1.x, so GX is called directly: an ephemeral context, a pandas
data source, one expectation per invariant.
"""


import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSpec,
    AssetIn,
    AssetKey,
    Config,
    ConfigurableResource,
    DagsterInstance,
    Failure,
    MetadataValue,
    multi_asset_check,
)
from pydantic import Field

from assets.keys import web_shard_partitions
from assets.metadata import md_table
from blip_core.data.ingest import DEFAULT_CONFIG
from resources.storage import Dataset, StorageResource

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Partitioned asset checks are a Dagster preview feature; we rely on it knowingly.
warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")

PASSED = "SUCCEEDED"
"""The execution status (its value: Dagster exports no public enum for it) of a check that passed."""
WEB_CHECKS = ("decodable_images", "schema", "caption_length", "unique_keys", "quarantine_ratio")
HUMAN_CHECKS = ("splits_disjoint",)
CORPUS_CHECKS = ("web_noise_ratio_in_band", "synthetic_noise_ratio_in_band", "no_eval_leak",
                 "not_empty")


# --------------------------------------------------------------------------------------------
# Great Expectations, called directly


@dataclass
class Expectation:
    """The outcome of one expectation: did it pass, and what GX observed."""

    passed: bool
    observed: dict[str, Any]


class Validator:
    """Validates one pandas DataFrame against GX 1.x expectations (ephemeral, no analytics)."""

    def __init__(self, name: str, frame: Any) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        batch_def = (context.data_sources.add_pandas(name).add_dataframe_asset(name)
                     .add_batch_definition_whole_dataframe("all"))
        self.batch = batch_def.get_batch(batch_parameters={"dataframe": frame})
        self.gx = gx

    def check(self, expectation_name: str, **kwargs: Any) -> Expectation:
        """Runs ``gx.expectations.<expectation_name>(**kwargs)`` on the frame."""
        expectation = getattr(self.gx.expectations, expectation_name)(**kwargs)
        result = self.batch.validate(expectation)
        observed = {k: v for k, v in (result.result or {}).items()
                    if k in ("observed_value", "element_count", "unexpected_count",
                             "unexpected_percent", "partial_unexpected_list")}
        observed["expectation"] = expectation_name
        return Expectation(bool(result.success), _plain(observed))


def _plain(x: Any) -> Any:
    """JSON-friendly copy of GX result values (numpy scalars, tuples)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set):
        return [_plain(v) for v in x][:20]
    if hasattr(x, "item"):
        return x.item()
    return x


def _result(check: str, asset: str, outcomes: Sequence[Expectation], **observed: Any) -> AssetCheckResult:
    """One check's result: passed when every expectation passed; observed values as metadata."""
    metadata: dict[str, Any] = {k: _metadata_value(v) for k, v in observed.items()}
    metadata["expectations"] = MetadataValue.json([o.observed | {"success": o.passed} for o in outcomes])
    return AssetCheckResult(check_name=check, asset_key=asset, metadata=metadata,
                            passed=all(o.passed for o in outcomes))


def _metadata_value(v: Any) -> Any:
    if isinstance(v, bool):
        return MetadataValue.bool(v)
    if isinstance(v, int):
        return MetadataValue.int(v)
    if isinstance(v, float):
        return MetadataValue.float(v)
    if isinstance(v, dict | list):
        return MetadataValue.json(_plain(v))
    return MetadataValue.text(str(v))


# --------------------------------------------------------------------------------------------
# web_shards


class WebShardCheckConfig(Config):
    """Bounds of the web shard checks."""

    min_caption_chars: int = Field(default=1, description="shortest accepted caption")
    max_caption_chars: int = Field(default=DEFAULT_CONFIG.max_caption_chars,
                                   description="longest accepted caption (as ingest)")
    max_quarantine_ratio: float = Field(
        default=0.2, description="a shard with more of its samples quarantined is rejected"
    )


def _shard_rows(folder: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Parquet rows, per-sample tar facts, and ingest stats of one validated shard."""
    import pandas as pd

    from blip_core.data.formats import PARQUET_SCHEMA, Rejection, iter_shard, list_shards
    from blip_core.data.ingest import InvalidSample, decode_image

    stats = json.loads((folder / "stats.json").read_text())
    parquet = [p.with_suffix(".parquet") for p in list_shards(folder)]
    table = pd.concat([pd.read_parquet(p) for p in parquet], ignore_index=True) if parquet \
        else pd.DataFrame({c: pd.Series(dtype=object) for c in PARQUET_SCHEMA.names})
    samples = []
    for shard in list_shards(folder):
        for item in iter_shard(shard):
            readable = not isinstance(item, Rejection)
            row = {"key": item.key, "readable": readable, "decodable": False,
                   "members": ",".join(sorted(item.files)) if readable else ""}
            if readable:
                try:
                    decode_image(item.files.get("jpg", b""))
                    row["decodable"] = True
                except InvalidSample:
                    pass
            samples.append(row)
    frame = pd.DataFrame(samples, columns=["key", "readable", "decodable", "members"])
    return table, frame, stats


@multi_asset_check(
    specs=[
        AssetCheckSpec("decodable_images", asset="web_shards", blocking=True,
                       partitions_def=web_shard_partitions,
                       description="every kept sample's image decodes (PIL, full decode)"),
        AssetCheckSpec("schema", asset="web_shards", blocking=True, partitions_def=web_shard_partitions,
                       description="parquet has img2dataset's columns and stored_sha256; tar holds "
                                   "jpg+txt+json per key"),
        AssetCheckSpec("caption_length", asset="web_shards", blocking=True,
                       partitions_def=web_shard_partitions,
                       description="caption lengths (characters) inside the configured bounds"),
        AssetCheckSpec("unique_keys", asset="web_shards", blocking=True,
                       partitions_def=web_shard_partitions, description="no sample key twice"),
        AssetCheckSpec("quarantine_ratio", asset="web_shards", blocking=True,
                       partitions_def=web_shard_partitions,
                       description="share of the landed shard that was quarantined under the limit"),
    ],
    ins={"web_shards": AssetIn()},
)
def web_shard_checks(context: AssetCheckExecutionContext, config: WebShardCheckConfig,
                     storage: StorageResource, web_shards: dict[str, Dataset]) -> Iterator[AssetCheckResult]:
    """The five invariants of one validated web shard."""
    import pandas as pd

    from blip_core.data.formats import REQUIRED_COLUMNS
    from blip_core.data.ingest import quarantine_ratio

    (ds,) = web_shards.values()
    with storage.local_dir(ds.key) as folder:
        table, samples, stats = _shard_rows(folder)
    ratio = quarantine_ratio(stats)

    gx_samples = Validator("web_samples", samples)
    yield _result("decodable_images", "web_shards", [
        gx_samples.check("ExpectTableRowCountToBeBetween", min_value=1),
        gx_samples.check("ExpectColumnValuesToBeInSet", column="decodable", value_set=[True]),
    ], samples=len(samples), undecodable=int((~samples["decodable"].astype(bool)).sum()))

    gx_table = Validator("web_parquet", table)
    lengths = table["caption"].astype(str).str.len() if len(table) else table["caption"]
    yield _result("schema", "web_shards", [
        gx_table.check("ExpectTableColumnsToMatchSet", column_set=list(REQUIRED_COLUMNS),
                       exact_match=False),  # the producer's other columns pass through
        gx_table.check("ExpectColumnValuesToNotBeNull", column="key"),
        gx_table.check("ExpectColumnValuesToNotBeNull", column="caption"),
        gx_table.check("ExpectTableRowCountToEqual", value=len(samples)),
        gx_samples.check("ExpectColumnValuesToBeInSet", column="members", value_set=["jpg,json,txt"]),
    ], columns=list(table.columns), rows=len(table))

    yield _result("caption_length", "web_shards", [
        gx_table.check("ExpectColumnValueLengthsToBeBetween", column="caption",
                       min_value=config.min_caption_chars, max_value=config.max_caption_chars),
    ], min_chars=int(lengths.min()) if len(table) else 0, max_chars=int(lengths.max()) if len(table) else 0,
        bounds=[config.min_caption_chars, config.max_caption_chars])

    yield _result("unique_keys", "web_shards", [
        gx_table.check("ExpectColumnValuesToBeUnique", column="key"),
        gx_samples.check("ExpectColumnValuesToBeUnique", column="key"),
    ], keys=len(table), duplicates=int(table["key"].duplicated().sum()) if len(table) else 0)

    gx_ratio = Validator("web_quarantine", pd.DataFrame({"quarantine_ratio": [ratio]}))
    yield _result("quarantine_ratio", "web_shards", [
        gx_ratio.check("ExpectColumnValuesToBeBetween", column="quarantine_ratio", min_value=0.0,
                       max_value=config.max_quarantine_ratio),
    ], quarantine_ratio=round(ratio, 4), kept=stats["kept"], quarantined=stats["quarantined"],
        by_reason=stats.get("by_reason", {}), limit=config.max_quarantine_ratio)


@dataclass(frozen=True)
class CheckProblem:
    """An asset check that did not pass on the latest materialization of its asset (partition)."""

    key: AssetCheckKey
    partition: str | None  # None: an unpartitioned asset
    problem: str  # its status in lower case ("failed"), or "did not run on the latest materialization"

    def __str__(self) -> str:
        where = self.key.to_user_string() + (f"[{self.partition}]" if self.partition else "")
        return f"{where} {self.problem}"


def check_keys(asset: str, checks: Sequence[str]) -> list[AssetCheckKey]:
    """The keys of ``asset``'s checks named ``checks``."""
    return [AssetCheckKey(AssetKey(asset), name) for name in checks]


def check_problems(instance: DagsterInstance, keys: Sequence[AssetCheckKey],
                   partitions: Sequence[str] | None = None) -> list[CheckProblem]:
    """The checks among ``keys`` that did not pass on the latest materialization of their asset:
    those that failed, and those that did not run on it.

    Args:
        instance: The Dagster instance holding the check results.
        keys: The checks, in the order of the result.
        partitions: The partitions to look at; default: every materialized partition of a
            partitioned asset (an unpartitioned one has none).
    """
    problems: list[CheckProblem] = []
    for key in keys:
        wanted = list(partitions) if partitions is not None else \
            sorted(instance.get_materialized_partitions(key.asset_key)) or None
        infos = instance.event_log_storage.get_asset_check_partition_info([key], partition_keys=wanted)
        by_partition = {i.partition_key: i for i in infos}
        for pk in wanted if wanted is not None else [None]:
            info = by_partition.get(pk)
            if info is None or not info.is_current:
                problems.append(CheckProblem(key, pk, "did not run on the latest materialization"))
            elif info.latest_execution_status.value != PASSED:
                problems.append(CheckProblem(key, pk, info.latest_execution_status.value.lower()))
    return problems


def require_passed_checks(context: Any, asset: str, checks: Sequence[str]) -> None:
    """Raises unless every named check passed on the latest materialization of ``asset``.

    Blocking checks stop downstream steps inside one run; this extends that to later runs: a
    corpus that failed its noise band is not pre-trained on by a run that skipped the check.
    """
    bad = [str(p) for p in check_problems(context.instance, check_keys(asset, checks))]
    if bad:
        raise Failure(
            description=f"{len(bad)} blocking check(s) of {asset} did not pass: " + "; ".join(bad[:5]),
            metadata={"problems": MetadataValue.md("\n".join(f"- {b}" for b in bad[:50]))},
        )


class ShardPolicy(ConfigurableResource):
    """Which web shards the training and CapFilt assets use when some failed their checks.

    At web scale some shards always fail (every download of a shard failed, a corrupt upload):
    ``skip-failed`` (default) leaves them out, with their reasons in the asset's metadata, as
    long as at least ``min_good_share`` of the shards passed; ``strict`` refuses to go on
    while any shard failed. The corpus's noise-ratio checks stay blocking either way.
    """

    mode: Literal["skip-failed", "strict"] = Field(
        default="skip-failed", description="skip-failed: leave failed shards out; strict: stop")
    min_good_share: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="skip-failed stops when fewer than this share of the shards passed")


@dataclass
class ShardSelection:
    """The web shards an asset uses, and those it leaves out with their reasons."""

    used: dict[str, Dataset]  # partition -> published dataset, every check passed
    excluded: dict[str, list[str]]  # partition -> problems

    def metadata(self) -> dict[str, Any]:
        """Asset metadata: counts, and ``{shard: reasons}`` of the excluded shards."""
        return {
            "web_shards_used": MetadataValue.int(len(self.used)),
            "web_shards_excluded": MetadataValue.int(len(self.excluded)),
            "excluded_shards": MetadataValue.json({pk: "; ".join(why)
                                                   for pk, why in sorted(self.excluded.items())}),
        }


def select_shards(context: Any, policy: ShardPolicy, web_shards: dict[str, Dataset]) -> ShardSelection:
    """The web shards whose latest materialization passed every check, per ``policy``.

    Records the selection in the asset's metadata (:meth:`ShardSelection.metadata`).

    Args:
        context: The asset's execution context (its instance holds the check results).
        policy: What to do with failed shards.
        web_shards: The input: published partitions (a partition never published is absent).

    Raises:
        Failure: ``strict`` and a shard failed, or fewer than ``min_good_share`` passed.
    """
    partitions = sorted(context.asset_partition_keys_for_input("web_shards"))
    excluded = {pk: ["not published: its ingestion did not complete"]
                for pk in partitions if pk not in web_shards}
    for p in check_problems(context.instance, check_keys("web_shards", WEB_CHECKS), sorted(web_shards)):
        excluded.setdefault(str(p.partition), []).append(f"check {p.key.name} {p.problem}")
    selection = ShardSelection({pk: web_shards[pk] for pk in sorted(web_shards) if pk not in excluded},
                               excluded)
    context.add_asset_metadata(selection.metadata())
    if excluded:
        context.log.warning(f"{len(excluded)} of {len(partitions)} web shard(s) excluded: " + "; ".join(
            f"{pk}: {', '.join(why)}" for pk, why in sorted(excluded.items())[:10]))
    share = len(selection.used) / len(partitions) if partitions else 0.0
    if (policy.mode == "strict" and excluded) or not selection.used or share < policy.min_good_share:
        rule = "strict shard policy" if policy.mode == "strict" and excluded else \
            f"fewer than {policy.min_good_share:.0%} of the shards passed"
        raise Failure(
            description=f"{len(excluded)} of {len(partitions)} web shard(s) did not pass their checks "
                        f"({rule}): " + "; ".join(f"web_shards[{pk}]: {', '.join(why)}"
                                                  for pk, why in sorted(excluded.items())[:5]),
            metadata=selection.metadata(),
        )
    return selection


# --------------------------------------------------------------------------------------------
# human_pairs


def _human_frame(folder: Path) -> Any:
    import pandas as pd

    from blip_core.data.formats import read_karpathy
    from blip_core.io import sha256_file

    images = read_karpathy(folder / "annotations.json")
    return pd.DataFrame([{"image_id": im.image_id, "split": im.split,
                          "sha256": sha256_file(folder / im.image)} for im in images],
                        columns=["image_id", "split", "sha256"])


@multi_asset_check(
    specs=[AssetCheckSpec("splits_disjoint", asset="human_pairs", blocking=True,
                          description="no image (by id or by content) in two of train/val/test")],
    ins={"human_pairs": AssetIn()},
)
def human_pairs_checks(storage: StorageResource, human_pairs: Dataset) -> Iterator[AssetCheckResult]:
    """Train, val and test share no image."""
    import pandas as pd

    with storage.local_dir(human_pairs.key) as folder:
        frame = _human_frame(folder)
    per_hash = frame.groupby("sha256")["split"].nunique().rename("splits").reset_index() if len(frame) \
        else pd.DataFrame({"sha256": [], "splits": []})
    gx_images = Validator("human_images", frame)
    gx_hashes = Validator("human_hashes", per_hash)
    yield _result("splits_disjoint", "human_pairs", [
        gx_images.check("ExpectTableRowCountToBeBetween", min_value=1),
        gx_images.check("ExpectColumnValuesToBeUnique", column="image_id"),
        gx_hashes.check("ExpectColumnValuesToBeBetween", column="splits", min_value=1, max_value=1),
    ], images_per_split=dict(Counter(frame["split"])),
        images_in_several_splits=int((per_hash["splits"] > 1).sum()) if len(per_hash) else 0)


# --------------------------------------------------------------------------------------------
# bootstrapped_corpus


class NoiseBandConfig(Config):
    """Accepted noise ratios (share of texts the filter removed) of the bootstrapped corpus.

    Defaults suit the shapes world: with 40 % noisy web texts a good filter removes about
    that share; of the synthetic captions it should remove few.
    """

    web_min: float = Field(default=0.15, description="fewest web texts removed (share)")
    web_max: float = Field(default=0.75, description="most web texts removed (share)")
    synthetic_min: float = Field(default=0.0, description="fewest synthetic captions removed")
    synthetic_max: float = Field(default=0.5, description="most synthetic captions removed")


def _corpus_frame(folder: Path) -> Any:
    import pandas as pd

    from blip_core.data.formats import Rejection, iter_shard, list_shards
    from blip_core.io import sha256_bytes

    rows = []
    for shard in list_shards(folder):
        for item in iter_shard(shard):
            if isinstance(item, Rejection):
                raise Failure(f"corpus shard {shard.name} is unreadable: {item}")
            files = item.files
            meta = json.loads(files.get("json", b"{}"))
            rows.append({"key": item.key, "image_id": str(meta.get("image_id", "")),
                         "source": meta.get("source", ""), "sha256": sha256_bytes(files.get("jpg", b""))})
    return pd.DataFrame(rows, columns=["key", "image_id", "source", "sha256"])


@multi_asset_check(
    specs=[
        AssetCheckSpec("web_noise_ratio_in_band", asset="bootstrapped_corpus", blocking=True,
                       description="share of web texts the filter removed is inside the band"),
        AssetCheckSpec("synthetic_noise_ratio_in_band", asset="bootstrapped_corpus", blocking=True,
                       description="share of synthetic captions the filter removed is inside the band"),
        AssetCheckSpec("no_eval_leak", asset="bootstrapped_corpus", blocking=True,
                       additional_deps=["human_pairs"],
                       description="no val/test image of human_pairs (by id or content) in the corpus"),
        AssetCheckSpec("not_empty", asset="bootstrapped_corpus", blocking=True,
                       description="the corpus has samples"),
    ],
    ins={"bootstrapped_corpus": AssetIn(), "human_pairs": AssetIn()},
)
def bootstrapped_corpus_checks(
    config: NoiseBandConfig, storage: StorageResource, bootstrapped_corpus: Dataset,
    human_pairs: Dataset,
) -> Iterator[AssetCheckResult]:
    """Noise ratios in band, no evaluation image inside, not empty."""
    import pandas as pd

    with storage.local_dir(bootstrapped_corpus.key) as folder:
        manifest = json.loads((folder / "manifest.json").read_text())
        corpus = _corpus_frame(folder)
    with storage.local_dir(human_pairs.key) as folder:
        human = _human_frame(folder)
    counts, noise = manifest["counts"], manifest["noise_ratio"]
    frame = pd.DataFrame({"web": [noise["web"]], "synthetic": [noise["synthetic"]]})
    ratios = Validator("corpus_ratios", frame)
    for source, lo, hi in (("web", config.web_min, config.web_max),
                           ("synthetic", config.synthetic_min, config.synthetic_max)):
        yield _result(f"{source}_noise_ratio_in_band", "bootstrapped_corpus", [
            ratios.check("ExpectColumnValuesToBeBetween", column=source, min_value=lo, max_value=hi),
        ], noise_ratio=round(float(noise[source]), 4), band=[lo, hi],
            kept=counts[f"{source}_kept"], removed=counts[f"{source}_removed"])

    held_out = human[human["split"].isin(["val", "test"])]
    eval_ids = {f"human/{i}" for i in held_out["image_id"]}
    corpus["leak"] = corpus["image_id"].isin(eval_ids) | corpus["sha256"].isin(set(held_out["sha256"]))
    gx_corpus = Validator("corpus", corpus)
    leaks = corpus[corpus["leak"]]
    yield _result("no_eval_leak", "bootstrapped_corpus", [
        gx_corpus.check("ExpectColumnValuesToBeInSet", column="leak", value_set=[False]),
    ], eval_images=len(held_out), leaked_samples=len(leaks),
        leaked_image_ids=sorted(set(leaks["image_id"]))[:20])

    yield _result("not_empty", "bootstrapped_corpus", [
        gx_corpus.check("ExpectTableRowCountToBeBetween", min_value=1),
    ], samples=len(corpus), per_source=dict(Counter(corpus["source"])))


ALL_CHECKS = [web_shard_checks, human_pairs_checks, bootstrapped_corpus_checks]


def checks_table(results: Sequence[Any]) -> str:
    """Markdown table of asset check evaluations (for summaries)."""
    return md_table([{"asset": r.asset_key.to_user_string(), "check": r.check_name,
                      "passed": r.passed} for r in results])
