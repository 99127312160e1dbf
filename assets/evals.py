"""Downstream evaluation: the baseline and the bootstrapped model side by side."""


from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self

from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.capfilt import measure_filter
from assets.keys import GROUP, IO_MANAGER_KEY
from assets.metadata import dataset_metadata, stopwatch
from assets.models import RECIPE
from assets.plots import png_file_markdown
from assets.publishing import code_version, identity, publish, read_json, reusable, staging
from assets.tools import Tools
from blip_core.io import atomic_write_json
from blip_core.recipe import Recipe
from blip_core.report import REPORT_METRICS, beats
from resources.dvc import DVC_POOL, DvcResource
from resources.mlflow_tracking import MlflowResource
from resources.storage import Dataset, StorageResource


class EvalSettings(Config):
    """How both models are evaluated on the human pairs (defaults: the recipe's)."""

    split: str = Field(default=RECIPE.eval.split, description="human split to evaluate on")
    k: int = Field(default=RECIPE.eval.k, description="ITM re-ranks the top-k of ITC")
    caption_method: str = Field(default=RECIPE.eval.caption_method, description="greedy, beam or nucleus")
    device: str = Field(default=RECIPE.device, description="cpu, cuda or auto (cuda when available)")

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Self:
        """The settings of ``recipe``."""
        e = recipe.eval
        return cls(split=e.split, k=e.k, caption_method=e.caption_method, device=recipe.device)


@asset(group_name=GROUP, pool=DVC_POOL, io_manager_key=IO_MANAGER_KEY, code_version=code_version("1"),
       kinds={"pytorch", "mlflow"},
       description="Retrieval R@k (ITC top-k + ITM re-rank) and captioning BLEU-4 / CIDEr, "
                   "baseline pretrained_med vs bootstrapped_med.")
def downstream_evals(context: AssetExecutionContext, config: EvalSettings, storage: StorageResource,
                     mlflow: MlflowResource, dvc: DvcResource, pretrained_med: Dataset,
                     bootstrapped_med: Dataset, human_pairs: Dataset,
                     bootstrapped_corpus: Dataset) -> MaterializeResult[Dataset]:
    """Evaluate both models and write ``report.json`` (the ``blip-core bootstrap`` layout)."""
    models = {"baseline": pretrained_med, "bootstrapped": bootstrapped_med}
    ident = identity(context, config, {**models, "human_pairs": human_pairs,
                                       "bootstrapped_corpus": bootstrapped_corpus})
    with ExitStack() as stack, stopwatch() as t:
        ds = reusable(context, storage, "downstream_evals", ident)
        reused, tracking = ds is not None, {}
        if ds is None:
            tmp = stack.enter_context(staging(storage)) / "out"
            tmp.mkdir()
            with mlflow.start_run(context, "downstream_evals") as run:
                evaluate(context, config, storage, models, human_pairs, bootstrapped_corpus, tmp)
                ds = publish(storage, "downstream_evals", tmp, identity=ident)
                report = storage.read_json(f"{ds.key}/report.json")
                run.log_params({**config.model_dump(),
                                **{f"{name}.data_version": d.version for name, d in models.items()}})
                run.log_metrics({f"{name}.{k}": v for name in models for k, v in report[name].items()})
                run.set_tags({"data_version": ds.version})
                tracking = run.metadata()
        versioned = Tools(storage, dvc=dvc).dvc_metadata(ds, reused=reused)
        folder = stack.enter_context(storage.local_dir(ds.key))
        report = read_json(folder / "report.json")
        table = (folder / "comparison.md").read_text(encoding="utf-8")
        plot = png_file_markdown(folder / "comparison.png", "baseline vs bootstrapped")
    deltas = {k: report["bootstrapped"][k] - report["baseline"][k] for k in REPORT_METRICS}
    metadata: dict[str, Any] = {
        **dataset_metadata(ds, t["seconds"]),
        "comparison": MetadataValue.md(table),
        "comparison_plot": MetadataValue.md(plot),
        "baseline": MetadataValue.json(report["baseline"]),
        "bootstrapped": MetadataValue.json(report["bootstrapped"]),
        **{f"delta_{k.replace('@', '_at_')}": MetadataValue.float(round(v, 4)) for k, v in deltas.items()},
        "bootstrapped_beats_baseline": MetadataValue.bool(beats(report)),
        "reused": MetadataValue.bool(reused),
        **versioned,
        **tracking,
    }
    for k in ("precision", "recall"):
        if k in report["filter"]:
            metadata[f"filter_{k}"] = MetadataValue.float(round(report["filter"][k], 4))
    return MaterializeResult(value=ds, data_version=DataVersion(ds.version), metadata=metadata)


def evaluate(context: AssetExecutionContext, config: EvalSettings, storage: StorageResource,
             models: dict[str, Dataset], human_pairs: Dataset, bootstrapped_corpus: Dataset,
             out: Path) -> None:
    """Writes ``metrics.json``, ``comparison.md``, ``comparison.png`` and ``report.json`` to ``out``."""
    from blip_core.evaluate import evaluate_checkpoint
    from blip_core.report import build_report, write_comparison

    with ExitStack() as stack:
        human = stack.enter_context(storage.local_dir(human_pairs.key)) / "annotations.json"
        results: dict[str, dict[str, Any]] = {}
        for name, ds in models.items():
            ckpt = stack.enter_context(storage.local_dir(ds.key))
            context.log.info(f"evaluating {name} ({ds.uri}) on the human {config.split} split")
            results[name] = evaluate_checkpoint(str(ckpt), str(human), split=config.split, k=config.k,
                                                device=config.device,
                                                caption_kwargs={"method": config.caption_method})
        corpus = stack.enter_context(storage.local_dir(bootstrapped_corpus.key))
        manifest = read_json(corpus / "manifest.json")
        quality = measure_filter(storage, corpus)
    write_comparison(results, out, split=config.split, k=config.k)
    atomic_write_json(out / "report.json", build_report(
        results, manifest, quality, split=config.split,
        checkpoints={name: ds.uri for name, ds in models.items()},
        versions={name: ds.version for name, ds in models.items()}))
