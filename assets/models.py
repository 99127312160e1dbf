"""The four trained models: the baseline, the captioner and filter, and the bootstrapped model.

Each asset maps its Dagster config onto ``blip_core.recipe.stage_config`` (the same recipe
``blip-core bootstrap`` runs, defaults included) and trains through the launcher resource (in
this process, a Pipes subprocess, or a Kubernetes pod) inside an MLflow run (config, inputs with
their DVC hashes, per-step losses, the model). It trains in a work folder keyed by code, config
and input versions (a killed run resumes there) and publishes the checkpoint folder
(``config.json``, ``model.safetensors``, ``tokenizer/``; ``trainer_state/`` stays behind).
Re-materialising with the same code, config and inputs reuses the published checkpoint.
"""


import shutil
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.checks import ShardPolicy, select_shards
from assets.keys import GROUP, IO_MANAGER_KEY
from assets.metadata import dataset_metadata, history_summary, stopwatch
from assets.plots import loss_plot
from assets.publishing import code_version, identity, publish, read_json, reusable
from assets.tools import Tools
from blip_core.recipe import Recipe, Stage, stage_config
from resources.dvc import DvcResource
from resources.launcher import TrainingLauncher
from resources.mlflow_tracking import MlflowResource
from resources.storage import Dataset, StorageResource

RECIPE = Recipe()
"""The default recipe; every config default of the assets comes from it."""


class TrainSettings(Config):
    """Settings shared by every training stage."""

    preset: str = Field(default=RECIPE.preset, description="model preset: tiny, base, large")
    seed: int = Field(default=RECIPE.seed, description="seeds initialisation, data order, sampling")
    precision: str = Field(
        default=RECIPE.precision,
        description="auto: the fastest the hardware runs natively; fp32; bf16-lm: fp32 but the LM's "
                    "vocabulary projection in bf16 (fast on CPUs with AVX512-BF16/AMX); bf16: autocast "
                    "everywhere (GPUs)")
    device: str = Field(default=RECIPE.device, description="cpu, cuda or auto (cuda when available)")
    max_steps: int = Field(default=RECIPE.pretrain.max_steps, description="optimizer steps")
    batch_size: int = Field(default=RECIPE.pretrain.batch_size, description="pairs per step")
    lr: float = Field(default=RECIPE.pretrain.lr, description="peak learning rate")
    warmup_steps: int = Field(default=RECIPE.pretrain.warmup_steps, description="linear warm-up")

    @classmethod
    def from_recipe(cls, recipe: Recipe, task: str) -> Self:
        """The settings of ``recipe``'s stage ``task`` (pretrain, captioner or filter)."""
        stage = recipe.stage(task)
        return cls(preset=recipe.preset, seed=recipe.seed, precision=recipe.precision,
                   device=recipe.device, max_steps=stage.max_steps, batch_size=stage.batch_size,
                   lr=stage.lr, warmup_steps=stage.warmup_steps)

    def stage(self) -> Stage:
        """This stage's optimisation settings."""
        return Stage(max_steps=self.max_steps, batch_size=self.batch_size, lr=self.lr,
                     warmup_steps=self.warmup_steps)

    def recipe(self) -> Recipe:
        """The recipe with this asset's global settings."""
        return Recipe(preset=self.preset, seed=self.seed, precision=self.precision, device=self.device)


class PretrainSettings(TrainSettings):
    """Pre-training (ITC + ITM + LM); the baseline and the bootstrapped model share it."""


class CaptionerSettings(TrainSettings):
    """Captioner fine-tune (LM) on the human train pairs."""

    max_steps: int = Field(default=RECIPE.captioner.max_steps, description="optimizer steps")
    batch_size: int = Field(default=RECIPE.captioner.batch_size, description="pairs per step")
    lr: float = Field(default=RECIPE.captioner.lr, description="peak learning rate")
    warmup_steps: int = Field(default=RECIPE.captioner.warmup_steps, description="linear warm-up")


class FilterSettings(TrainSettings):
    """Filter fine-tune (ITC + ITM) on the human train pairs."""

    max_steps: int = Field(default=RECIPE.filter.max_steps, description="optimizer steps")
    batch_size: int = Field(default=RECIPE.filter.batch_size, description="pairs per step")
    lr: float = Field(default=RECIPE.filter.lr, description="peak learning rate")
    warmup_steps: int = Field(default=RECIPE.filter.warmup_steps, description="linear warm-up")


MODEL_TASK = {"pretrain": "med", "captioner": "captioner", "filter": "filter"}
"""What the MLflow pyfunc of each stage's checkpoint predicts."""
# The fine-tuned models are registered as they are trained; blip-med is registered by promotion.
REGISTERED_NAMES = {"captioner": "blip-captioner", "filter": "blip-filter"}


def train_stage(context: AssetExecutionContext, tools: Tools, settings: TrainSettings, task: str,
                sources: list[tuple[str, str]], inputs: dict[str, Dataset],
                init_from: Dataset | None = None) -> MaterializeResult[Dataset]:
    """Trains one stage through the launcher, tracks it in MLflow, publishes the checkpoint.

    Args:
        sources: Training data as ``(input name, suffix)``: the input's folder plus the suffix
            is a ``blip_core`` source (``("human_pairs", "/annotations.json:train")``).
        inputs: Upstream datasets by name.
        init_from: Checkpoint to fine-tune from.
    """
    storage = tools.storage
    asset_name = context.asset_key.path[-1]
    ident = identity(context, settings, {**inputs, "init_from": init_from})
    with ExitStack() as stack, stopwatch() as t:
        ds = reusable(context, storage, asset_name, ident)
        reused = ds is not None
        tracking: dict[str, Any] = {}
        if ds is None:
            remote = tools.launcher_is_remote()
            where = (lambda d: storage.uri(d.key)) if remote else \
                (lambda d: str(stack.enter_context(storage.local_dir(d.key))))
            local = {name: where(d) for name, d in inputs.items()}
            init = where(init_from) if init_from else None
            data = [local[name] + suffix for name, suffix in sources]
            # Work folder keyed by the identity: a killed run with the same code, config and
            # inputs resumes there (trainer_state/); anything else starts afresh.
            work_key = f"train/{asset_name}/{ident[:16]}"
            work = storage.scratch_dir(work_key)
            out = f"{storage.uri('work/' + work_key)}/checkpoint" if remote else str(work / "checkpoint")
            cfg = replace(stage_config(settings.recipe(), settings.stage(), task, data, Path(out),
                                       init_from=init), out=out, progress=False)
            with tools.mlflow.start_run(context, asset_name) as run:
                run.log_config(cfg)
                for name, d in {**inputs, **({"init_from": init_from} if init_from else {})}.items():
                    run.log_dataset(name, d.uri, digest=tools.dvc_digest(d), tags={"data_version": d.version})

                def on_log(step: int, row: dict[str, float]) -> None:
                    terms = ", ".join(f"{k}={row[k]:.3f}" for k in ("itc", "itm", "lm") if k in row)
                    context.log.info(f"{asset_name} step {step}/{cfg.max_steps}: {terms}")
                    run.log_step(step, row)

                result = tools.launcher.train(context, cfg, on_log=on_log)
                run.log_history(result.history)  # the steps a resumed training did not re-run
                checkpoint = Path(result.checkpoint) if not remote else \
                    stack.enter_context(storage.local_dir(f"work/{work_key}/checkpoint", complete_only=False))
                ds = publish(storage, asset_name, checkpoint, exclude=("trainer_state",), move=False,
                             identity=ident, train_seconds=round(result.seconds, 2))
                with storage.local_dir(ds.key) as published:
                    run.log_model(published, task=MODEL_TASK[task],
                                  registered_model_name=REGISTERED_NAMES.get(task))
                run.set_tags({"data_version": ds.version, "storage_uri": ds.uri})
                tracking = run.metadata()
            shutil.rmtree(work, ignore_errors=True)
        with storage.local_dir(ds.key) as ckpt:
            meta = read_json(ckpt / "config.json").get("meta", {})
    marker = storage.marker(ds.key) or {}
    history = meta.get("history", [])
    metadata: dict[str, Any] = {
        **dataset_metadata(ds, t["seconds"]),
        "task": task,
        "steps": MetadataValue.int(int(meta.get("steps", 0))),
        "train_seconds": MetadataValue.float(float(marker.get("train_seconds") or 0.0)),
        "reused": MetadataValue.bool(reused),
        "train_config": MetadataValue.json({k: v for k, v in meta.get("train_config", {}).items()
                                            if k not in ("data", "out", "init_from")}),
        "inputs": MetadataValue.json({k: {"uri": v.uri, "version": v.version}
                                      for k, v in {**inputs, "init_from": init_from}.items() if v}),
        **history_summary(history),
        **tracking,
    }
    if history:
        metadata["loss_curve"] = MetadataValue.md(loss_plot(history, asset_name))
    return MaterializeResult(value=ds, data_version=DataVersion(ds.version), metadata=metadata)


HUMAN_TRAIN = ("human_pairs", "/annotations.json:train")


@asset(group_name=GROUP, io_manager_key=IO_MANAGER_KEY, code_version=code_version("1"), kinds={"pytorch"},
       description="Baseline MED pre-trained (ITC + ITM + LM) on every web shard + human train pairs.")
def pretrained_med(context: AssetExecutionContext, config: PretrainSettings, storage: StorageResource,
                   mlflow: MlflowResource, dvc: DvcResource, launcher: TrainingLauncher,
                   shard_policy: ShardPolicy, web_shards: dict[str, Dataset],
                   human_pairs: Dataset) -> MaterializeResult[Dataset]:
    """Pre-train the baseline on the noisy web pairs and the human train pairs."""

    web_shards = select_shards(context, shard_policy, web_shards).used
    inputs = {f"web_shards[{pk}]": ds for pk, ds in sorted(web_shards.items())}
    sources = [(name, "") for name in inputs] + [HUMAN_TRAIN]
    inputs["human_pairs"] = human_pairs
    return train_stage(context, Tools(storage, mlflow, dvc, launcher), config, "pretrain", sources, inputs)


@asset(group_name=GROUP, io_manager_key=IO_MANAGER_KEY, code_version=code_version("1"), kinds={"pytorch"},
       description="Captioner: the pre-trained decoder fine-tuned with LM on the human train pairs.")
def captioner(context: AssetExecutionContext, config: CaptionerSettings, storage: StorageResource,
              mlflow: MlflowResource, dvc: DvcResource, launcher: TrainingLauncher,
              pretrained_med: Dataset, human_pairs: Dataset) -> MaterializeResult[Dataset]:
    """Fine-tune the captioner (separately from the filter, paper Table 4)."""
    return train_stage(context, Tools(storage, mlflow, dvc, launcher), config, "captioner", [HUMAN_TRAIN],
                       {"human_pairs": human_pairs}, init_from=pretrained_med)


@asset(name="filter", group_name=GROUP, io_manager_key=IO_MANAGER_KEY, code_version=code_version("1"),
       kinds={"pytorch"},
       description="Filter: the pre-trained encoder fine-tuned with ITC + ITM on the human train pairs.")
def filter_model(context: AssetExecutionContext, config: FilterSettings, storage: StorageResource,
                 mlflow: MlflowResource, dvc: DvcResource, launcher: TrainingLauncher,
                 pretrained_med: Dataset, human_pairs: Dataset) -> MaterializeResult[Dataset]:
    """Fine-tune the filter (separately from the captioner, paper Table 4)."""
    return train_stage(context, Tools(storage, mlflow, dvc, launcher), config, "filter", [HUMAN_TRAIN],
                       {"human_pairs": human_pairs}, init_from=pretrained_med)


@asset(group_name=GROUP, io_manager_key=IO_MANAGER_KEY, code_version=code_version("1"), kinds={"pytorch"},
       description="MED pre-trained FROM SCRATCH on the bootstrapped corpus, same recipe as the baseline.")
def bootstrapped_med(context: AssetExecutionContext, config: PretrainSettings, storage: StorageResource,
                     mlflow: MlflowResource, dvc: DvcResource, launcher: TrainingLauncher,
                     bootstrapped_corpus: Dataset) -> MaterializeResult[Dataset]:
    """Pre-train a new model on the bootstrapped corpus."""
    from assets.checks import CORPUS_CHECKS, require_passed_checks

    require_passed_checks(context, "bootstrapped_corpus", CORPUS_CHECKS)
    return train_stage(context, Tools(storage, mlflow, dvc, launcher), config, "pretrain",
                       [("bootstrapped_corpus", "")], {"bootstrapped_corpus": bootstrapped_corpus})
