"""The main command: materialize the whole lineage and print a summary.

``python -m orchestration.main --data DIR [--recipe recipes/quick.yaml] [KEY=VALUE ...]``

1. lands the parts of the embedded shapes world ``DIR/landing`` lacks (the web shards unless
   shards are there, the human pairs unless ``human/annotations.json`` is), overwriting nothing;
2. adds one ``web_shards`` partition per complete landed shard (``resources.landing``);
3. materializes, in-process, each new shard (with its blocking checks), then everything
   downstream in one run, on the Dagster instance in ``DIR/dagster_home`` — the one the UI
   (``python -m orchestration.ui --data DIR``) opens, so the runs, metadata and plots are there;
4. prints baseline vs bootstrapped metrics, noise ratios, filter precision/recall and where
   the artefacts are.

Meanwhile the console shows a line per step, the trainings' progress, warnings and failures, then
the time per stage (``orchestration.console``); every Dagster event and the libraries' output go
to ``DIR/logs/run-<time>.log``.

Assets already made from the same code, config and inputs are reused, so a second run is fast.
"""

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orchestration  # noqa: F401  (telemetry off first)
from resources.storage import StorageResource

if TYPE_CHECKING:
    from blip_core.recipe import Recipe
    from orchestration.console import LineageConsole

DAGSTER_YAML = """\
# Written by orchestration.main / orchestration.ui: the instance the main command and the UI share.
telemetry:
  enabled: false
concurrency:
  runs:
    max_concurrent_runs: 1  # 2-core default machine: one training at a time
  pools:
    granularity: op
    default_limit: 1  # the "dvc" (DVC locks its repo) and "mlflow_registry" pools: one op at a time
"""


def prepare_home(data: Path) -> Path:
    """Creates ``DATA/dagster_home`` with its ``dagster.yaml`` and points ``DAGSTER_HOME`` there."""
    home = (data / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ["BLIP_OPS_DATA"] = str(data.resolve())
    return home


@dataclass
class WorldLanding:
    """What :func:`land_shapes_world` did to the landing area."""

    landed: list[str] = field(default_factory=list)  # keys it wrote
    kept: list[str] = field(default_factory=list)  # keys already there, left as they were
    skipped: list[str] = field(default_factory=list)  # parts of the world not landed, and why

    def describe(self, storage: StorageResource) -> str:
        """What was landed where, what was left as the user placed it (the first few named)."""
        lines = [f"landed {len(self.landed)} file(s) of the shapes world in {storage.uri('landing')}"]
        if self.kept:
            lines.append(f"  left {len(self.kept)} file(s) already there as they were: "
                         f"{', '.join(self.kept[:5])}{' ...' if len(self.kept) > 5 else ''}")
        lines += [f"  not landed: {s}" for s in self.skipped]
        return "\n".join(lines)


def land_shapes_world(storage: StorageResource, recipe: "Recipe | None" = None, **world: Any) -> WorldLanding:
    """Lands the parts of the embedded shapes world the landing area lacks, overwriting nothing.

    The web part (``web/`` shards, ``truth/web_truth.jsonl``, ``manifest.json``) is landed only
    when no ``.tar`` is landed, the human part (``human/``, ``truth/human_scenes.jsonl``) only
    when ``human/annotations.json`` is absent; of those, only files whose key is free are
    written (:meth:`StorageResource.publish_new_files`).

    Args:
        recipe: whose world (and seed) to generate (default: the recipe).
        world: ``WorldConfig`` overrides (tests use a tiny world).
    """
    import shutil
    import tempfile

    from blip_core.data.shapes import generate_world
    from blip_core.recipe import Recipe
    from resources.landing import LANDING_HUMAN, LANDING_WEB

    result = WorldLanding()
    unwanted: list[str] = []
    if storage.list_files(LANDING_WEB, suffix=".tar"):
        result.skipped.append(f"web shards: {storage.uri(LANDING_WEB)} already holds shards")
        unwanted += ["web", "truth/web_truth.jsonl", "manifest.json"]
    if "annotations.json" in storage.list_files(LANDING_HUMAN, suffix=".json"):
        result.skipped.append(f"human pairs: {storage.uri(LANDING_HUMAN + '/annotations.json')} exists")
        unwanted += ["human", "truth/human_scenes.jsonl"]
    if len(result.skipped) == 2:
        return result
    cfg = replace((recipe or Recipe()).world_config(), **world)
    with tempfile.TemporaryDirectory(dir=storage.scratch_dir("tmp")) as tmp:
        out = Path(tmp) / "world"
        generate_world(out, cfg)
        for rel in unwanted:
            if (out / rel).is_dir():
                shutil.rmtree(out / rel)
            else:
                (out / rel).unlink()
        result.landed, result.kept = storage.publish_new_files(out, "landing")
    return result


def register_shards(instance: Any, storage: StorageResource, settle_s: float = 1.0) -> list[str]:
    """Adds a ``web_shards`` partition for every ready landed shard not yet known; returns the new ones.

    A shard is ready when complete (``resources.landing``): its ``_stats.json`` beside it,
    or a closed tar unchanged over ``settle_s`` seconds; those still being written are named and
    left for the landing sensor or the next run.
    """
    from assets.keys import web_shard_partitions
    from resources.landing import ready_shards

    shards = ready_shards(storage, settle_s)
    if shards.pending:
        print(f"waiting for {len(shards.pending)} shard(s) still being written (not registered): "
              f"{', '.join(shards.pending)}", flush=True)
    known = set(instance.get_dynamic_partitions(web_shard_partitions.name))
    new = [s for s in shards.ready if s not in known]
    if new:
        instance.add_dynamic_partitions(web_shard_partitions.name, new)
    return new


@dataclass
class LineageResult:
    """The runs of one lineage materialization."""

    shard_runs: dict[str, Any] = field(default_factory=dict)  # partition -> ExecuteInProcessResult
    main_run: Any = None  # ExecuteInProcessResult of everything downstream, None if not started

    @property
    def success(self) -> bool:
        """Whether the lineage ran to the end: a shard whose run failed (its checks, say) is left
        out by the assets that read shards (``ShardPolicy``) and does not fail the lineage."""
        return self.main_run is not None and self.main_run.success

    @property
    def failed_shards(self) -> list[str]:
        """Partitions whose ingestion run failed in this lineage."""
        return sorted(pk for pk, run in self.shard_runs.items() if not run.success)

    def check_evaluations(self) -> list[Any]:
        """Every asset check evaluation of the runs."""
        runs = [r for r in [*self.shard_runs.values(), self.main_run] if r is not None]
        return [e for r in runs for e in r.get_asset_check_evaluations()]


def split_run_config(run_config: Mapping[str, Any] | None, ops: Sequence[str]) -> dict[str, Any]:
    """The part of a run config that configures ``ops`` (a run rejects config for other ops)."""
    all_ops = dict((run_config or {}).get("ops", {}))
    return {"ops": {k: v for k, v in all_ops.items() if k in ops}}


def check_run_config(run_config: Mapping[str, Any] | None, *jobs: Any) -> list[dict[str, Any]]:
    """Each job's part of ``run_config``, validated before anything runs.

    Raises:
        ValueError: the config names an op (asset or check) of none of the jobs (a typo would
            otherwise be ignored) or is not ``{"ops": {...}}``.
        dagster.DagsterInvalidConfigError: a field is unknown or of the wrong type.
    """
    from dagster import validate_run_config

    if run_config is not None and (not isinstance(run_config, Mapping)
                                   or not isinstance(run_config.get("ops", {}), Mapping)
                                   or set(run_config) - {"ops"}):
        raise ValueError("a lineage run config is {ops: {asset_or_check_op: {config: {...}}}}")
    names = [_op_names(job) for job in jobs]
    known = set().union(*names)
    unknown = sorted(set((run_config or {}).get("ops", {})) - known)
    if unknown:
        raise ValueError(f"the run config names unknown ops {unknown}; known: {sorted(known)}")
    parts = [split_run_config(run_config, job_names) for job_names in names]
    for job, part in zip(jobs, parts, strict=True):
        validate_run_config(job, part)
    return parts


def lineage_definitions(resources: Mapping[str, Any], assets: Sequence[Any] | None = None,
                        loggers: Mapping[str, Any] | None = None) -> Any:
    """``Definitions`` of the lineage's jobs over the given resources (tests pass their own) and
    loggers (default: Dagster's console logger)."""
    from dagster import Definitions, in_process_executor

    from orchestration import definitions as d

    return Definitions(assets=list(assets if assets is not None else d.assets), asset_checks=d.asset_checks,
                       jobs=[d.web_shards_job, d.bootstrap_job], resources=dict(resources),
                       executor=in_process_executor, loggers=dict(loggers) if loggers else None)


def materialize_lineage(instance: Any, resources: Mapping[str, Any],
                        run_config: Mapping[str, Any] | None = None,
                        partitions: Sequence[str] | None = None, tags: Mapping[str, str] | None = None,
                        assets: Sequence[Any] | None = None,
                        console: "LineageConsole | None" = None) -> LineageResult:
    """Materializes the given web shard partitions, then everything downstream.

    Runs ``web_shards_job`` once per partition, then ``bootstrap_job``, in this process, on
    ``instance``. A shard whose run failed (a blocking check included) does not stop the
    lineage: the assets that read shards leave it out, or stop, per the ``shard_policy``
    resource.

    Args:
        instance: The Dagster instance runs are recorded in.
        resources: See ``orchestration.definitions.build_resources``.
        run_config: ``{"ops": {asset_or_check_op: {"config": {...}}}}`` for any of them.
        partitions: Shards to (re-)materialize; default: the registered shards that are ready
            and were never ingested from their current landed version (new or re-landed).
        tags: Run tags.
        assets: The assets (default: those of ``orchestration.definitions``).
        console: Log the runs there (lines per step, full log in its file) instead of Dagster's
            console logger.

    Raises:
        ValueError, dagster.DagsterInvalidConfigError: ``run_config`` is wrong (see
            :func:`check_run_config`); raised before any run starts.
    """
    from assets.keys import web_shard_partitions

    defs = lineage_definitions(resources, assets, console.logger_defs() if console else None)
    if partitions is None:
        from resources.landing import ingested_version, ready_shards

        known = set(instance.get_dynamic_partitions(web_shard_partitions.name))
        ready = ready_shards(resources["storage"]).ready
        partitions = [pk for pk, version in ready.items()
                      if pk in known and ingested_version(instance, pk) != version]
    result = LineageResult()
    shard_job, main_job = defs.resolve_job_def("web_shards_job"), defs.resolve_job_def("bootstrap_job")
    shard_config, main_config = check_run_config(run_config, shard_job, main_job)
    if console is not None:  # after the check: a user's run config configures ops only
        shard_config, main_config = ({**part, **console.run_config} for part in (shard_config, main_config))
        for pk in partitions:
            console.plan(shard_job.name, _op_names(shard_job), pk)
        console.plan(main_job.name, _op_names(main_job))
    for pk in partitions:
        result.shard_runs[pk] = shard_job.execute_in_process(
            run_config=shard_config, instance=instance,
            partition_key=pk, raise_on_error=False, tags=tags,
        )
    result.main_run = main_job.execute_in_process(
        run_config=main_config, instance=instance,
        raise_on_error=False, tags=tags,
    )
    return result


def _op_names(job: Any) -> list[str]:
    """The job's ops (its steps: no dynamic outputs here), upstream first."""
    return [node.name for node in job.graph.nodes_in_topological_order]


def summary(storage: StorageResource, result: LineageResult, seconds: float,
            log_path: Path | None = None) -> str:
    """Baseline vs bootstrapped metrics, noise ratios, filter quality, checks, artefacts and,
    given ``log_path``, where the full log is."""
    from assets.checks import checks_table
    from blip_core.report import capfilt_lines, report_table
    from resources.storage import dataset_key

    lines: list[str] = []
    failed = [e for e in result.check_evaluations() if not e.passed]
    if storage.exists(dataset_key(["downstream_evals"])) and result.success:
        report = storage.read_json(f"{dataset_key(['downstream_evals'])}/report.json")
        lines += [f"## baseline vs bootstrapped (human {report.get('split', 'test')} split)", "",
                  report_table(report), "## CapFilt", *capfilt_lines(report)]
    excluded = _excluded_shards(result) or {pk: "its ingestion run failed" for pk in result.failed_shards}
    if excluded:
        lines += ["", f"## web shards left out of training ({len(excluded)})"]
        lines += [f"- {pk}: {why}" for pk, why in sorted(excluded.items())]
    registry = _registry_line(result)
    if registry:
        lines += ["", "## registry", registry]
    lines += ["", f"## checks ({len(result.check_evaluations()) - len(failed)} passed, "
              f"{len(failed)} failed)"]
    if failed:
        lines += ["", checks_table(failed)]
    lines += ["", "## artefacts"]
    for name in ("human_pairs", "pretrained_med", "captioner", "filter", "synthetic_captions",
                 "bootstrapped_corpus", "bootstrapped_med", "downstream_evals"):
        key = dataset_key([name])
        lines.append(f"- {name}: {storage.uri(key)}{'' if storage.exists(key) else ' (missing)'}")
    lines.append(f"- web_shards: {storage.uri(dataset_key(['web_shards']))}/<shard>")
    lines += ["", f"status: {'SUCCESS' if result.success else 'FAILED'} in {seconds:.0f}s",
              f"Dagster instance: {os.environ.get('DAGSTER_HOME')}"]
    if log_path is not None:
        lines.append(f"full log: {log_path}")
    return "\n".join(lines)


def _excluded_shards(result: LineageResult) -> dict[str, str]:
    """Shards ``pretrained_med`` left out in this run, with their reasons (its metadata, or that
    of its failure when the shard policy stopped it)."""
    if result.main_run is None:
        return {}
    for event in result.main_run.all_events:
        if event.step_key != "pretrained_med":
            continue
        if event.is_step_materialization:
            metadata = event.event_specific_data.materialization.metadata
        elif event.is_step_failure and event.step_failure_data.user_failure_data is not None:
            metadata = event.step_failure_data.user_failure_data.metadata
        else:
            continue
        if "excluded_shards" in metadata:
            return dict(metadata["excluded_shards"].value)
    return {}


def _registry_line(result: LineageResult) -> str:
    """What the promotion asset decided in this run ("" when it did not run)."""
    if result.main_run is None:
        return ""
    for event in result.main_run.get_asset_materialization_events():
        if event.asset_key.to_user_string() == "registered_model":
            meta = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
            verdict = "promoted to champion" if meta.get("promoted") else "not promoted"
            return (f"{meta.get('model_name')} v{meta.get('version')} ({meta.get('model_uri')}): {verdict} "
                    f"- {meta.get('reason')}")
    return ""


def lineage_run_config(recipe: "Recipe", config: Path | None = None) -> dict[str, Any]:
    """The run config of ``recipe``'s assets, with a Dagster run config YAML ``config`` over it."""
    import yaml

    from assets.recipe import recipe_run_config

    run_config = recipe_run_config(recipe)
    extra = (yaml.safe_load(config.read_text()) or {}) if config else {}
    if not isinstance(extra, dict) or not isinstance(extra.get("ops", {}), dict):
        raise ValueError("a lineage run config is {ops: {asset_or_check_op: {config: {...}}}}")
    for name, part in extra.get("ops", {}).items():
        op = run_config["ops"].setdefault(name, {})
        op["config"] = {**op.get("config", {}), **((part or {}).get("config") or {})}
    return {**extra, "ops": run_config["ops"]}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestration.main --data DIR [--recipe YAML] [--preset P] [KEY=VALUE ...]``."""
    p = argparse.ArgumentParser(
        prog="python -m orchestration.main",
        description="Materialize the whole BLIP lineage (embedded shapes world by default) on the "
                    "Dagster instance in DATA/dagster_home and print a summary.",
    )
    p.add_argument("--data", type=Path, default=Path("data"), help="data folder (default: data)")
    p.add_argument("--recipe", type=Path,
                   help="recipe YAML naming the fields it changes (recipes/quick.yaml; default: the "
                        "default recipe, blip_core/recipe.py)")
    p.add_argument("--preset", help="model preset of every training asset (default: the recipe's)")
    p.add_argument("--seed", type=int, help="seeds the world, training and sampling (default: the recipe's)")
    p.add_argument("--config", type=Path,
                   help="Dagster run config YAML ({ops: {asset: {config}}}), applied over the recipe")
    p.add_argument("--all-shards", action="store_true",
                   help="re-materialize every shard, not only new ones")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe fields, e.g. pretrain.max_steps=300 capfilt.threshold=0.6")
    args = p.parse_args(argv)

    start = time.time()
    from blip_core.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides, preset=args.preset, seed=args.seed)
        run_config = lineage_run_config(recipe, args.config)
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {args.recipe or args.config or 'recipe'}: {e}", file=sys.stderr)
        return 2
    prepare_home(args.data)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars only fill the log
    from dagster import DagsterInstance, DagsterInvalidConfigError

    from orchestration.console import LineageConsole
    from orchestration.definitions import resources_from_env

    resources = resources_from_env()
    storage = resources["storage"]
    console = LineageConsole(args.data / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log")
    print(f"full log (every Dagster event, the libraries' output): {console.log_path}", flush=True)
    try:
        print(land_shapes_world(storage, recipe).describe(storage), flush=True)
        with DagsterInstance.get() as instance:
            new = register_shards(instance, storage)
            print(f"web shards: {len(new)} new partition(s) {new}", flush=True)
            partitions = instance.get_dynamic_partitions("web_shards") if args.all_shards else None
            try:
                with console.capture():
                    result = materialize_lineage(instance, resources, run_config, partitions=partitions,
                                                 tags={"blip-ops/entry": "orchestration.main"},
                                                 console=console)
            except (ValueError, DagsterInvalidConfigError) as e:
                print(f"error: {args.config or 'the run config'}: {e}", file=sys.stderr)
                return 2
        print(f"\n{console.stage_table()}\n")
        print(summary(storage, result, time.time() - start, log_path=console.log_path))
    finally:
        console.close()
    print(f"\nbrowse it: python -m orchestration.ui --data {args.data}  (http://127.0.0.1:3000)")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
