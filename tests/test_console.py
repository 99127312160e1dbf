"""What a person sees of a lineage run (``orchestration.console``), and what goes to the log file."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_RUN_CONFIG, leaky_human_world
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    Definitions,
    asset,
    asset_check,
    define_asset_job,
    in_process_executor,
    resource,
)

from orchestration.console import LineageConsole
from orchestration.definitions import build_resources
from orchestration.main import materialize_lineage, register_shards, summary
from resources.launcher import LocalLauncher
from resources.storage import LocalStorage

NUMBER = r"\[ *\d+/\d+\]"
DURATION = r"(?:\d+\.\d s|\d+ s|\d+ min \d\d s)"
DAGSTER_NOISE = ("DEBUG", "STEP_INPUT", "STEP_OUTPUT", "LOADED_INPUT", "HANDLED_OUTPUT", "RESOURCE_INIT",
                 "ENGINE_EVENT", "Type check")


def _starts(text: str, label: str) -> list[str]:
    return re.findall(rf"{NUMBER} {re.escape(label)} \.\.\.", text)


def _ends(text: str, label: str) -> list[str]:
    """The end of each run of the step ``label``: ``done in 3.2 s`` or ``FAILED after 1.0 s: ...``."""
    return re.findall(rf"{NUMBER} {re.escape(label)}(?: \.\.\.)? ((?:done in|FAILED after) {DURATION}.*)$",
                      text, flags=re.MULTILINE)


@asset
def trained(context) -> int:
    for step in range(1, 11):
        context.log.info(f"trained step {step}/10: loss=1.000")
    context.log.warning("2 of 6 web shard(s) excluded")
    print("a library prints this")
    with warnings.catch_warnings():  # shown whatever filters earlier tests left (MLflow sets "once")
        warnings.simplefilter("always")
        warnings.warn("An input example was not provided (toy_job).", UserWarning, stacklevel=1)
    logging.getLogger("some.library").warning("a library's own warning")
    os.write(2, b"a subprocess writes this to stderr\n")
    return 1


@asset_check(asset=trained, blocking=False)
def loss_went_down(trained: int) -> AssetCheckResult:
    return AssetCheckResult(passed=False, severity=AssetCheckSeverity.WARN, description="the loss went up")


@asset
def evaluated(trained: int) -> int:
    raise ValueError("the model diverged\nat step 7, the details follow")


@asset
def promoted(evaluated: int) -> int:
    return evaluated


def _run_toy(console: LineageConsole, instance: DagsterInstance) -> Any:
    """The four toy steps (one fails, so ``promoted`` does not run) with ``console`` as the logger."""
    defs = Definitions(assets=[trained, evaluated, promoted], asset_checks=[loss_went_down],
                       jobs=[define_asset_job("toy_job", selection=AssetSelection.all())],
                       loggers=console.logger_defs(), executor=in_process_executor)
    job = defs.resolve_job_def("toy_job")
    console.plan("toy_job", [node.name for node in job.graph.nodes_in_topological_order])
    with console.capture():
        return job.execute_in_process(instance=instance, run_config=console.run_config, raise_on_error=False)


def test_console_shows_each_step_started_and_ended_and_the_log_file_has_everything(tmp_path, capfd):
    out = io.StringIO()
    console = LineageConsole(tmp_path / "logs" / "run.log", stream=out, progress_every_s=0)
    root_handlers, showwarning = list(logging.getLogger().handlers), warnings.showwarning
    with DagsterInstance.ephemeral() as instance:
        result = _run_toy(console, instance)
        stored = {e.dagster_event.event_type for e in instance.all_logs(result.run_id) if e.dagster_event}
    console.close()
    text, log = out.getvalue(), (tmp_path / "logs" / "run.log").read_text()

    assert not result.success
    for label in ("trained", "trained_loss_went_down", "evaluated"):
        assert len(_starts(text, label)) == 1, text
        assert len(_ends(text, label)) == 1, text
    assert _ends(text, "trained")[0].startswith("done in")
    assert sorted(re.findall(r"\[(\d)/4\] \w+ \.\.\.", text)) == ["1", "2", "3"]  # numbered over the plan
    failed = _ends(text, "evaluated")[0]
    assert re.fullmatch(rf"FAILED after {DURATION}: ValueError: the model diverged \[\.\.\.\]", failed)
    assert "at step 7" not in text and "Stack Trace" not in text and "Traceback" not in text
    assert "not run (toy_job): promoted" in text
    assert "! trained: 2 of 6 web shard(s) excluded" in text
    assert "! check trained:loss_went_down failed (WARN): the loss went up" in text
    assert len(re.findall(r"trained step \d+/10", text)) == 10  # every 10% (no time limit here)
    for noise in (*DAGSTER_NOISE, "a library prints", "input example", "a library's own warning",
                  "subprocess writes"):
        assert noise not in text, noise
    assert "\033[" not in text  # not a terminal: no colours

    for event in ("DEBUG", "STEP_INPUT", "LOADED_INPUT", "RESOURCE_INIT_STARTED", "STEP_START",
                  "STEP_SUCCESS", "STEP_FAILURE"):
        assert f" - {event}" in log or f"{event} " in log, event
    assert "at step 7, the details follow" in log  # the whole error, traceback included
    for noise in ("a library prints this", "UserWarning: An input example was not provided (toy_job)",
                  "[some.library] a library's own warning", "a subprocess writes this to stderr"):
        assert noise in log, noise
    assert {DagsterEventType.STEP_INPUT, DagsterEventType.LOADED_INPUT} <= stored  # the instance keeps all

    captured = capfd.readouterr()  # nothing of the run reached the process's stdout or stderr
    assert "a library prints" not in captured.out + captured.err
    assert "subprocess writes" not in captured.out + captured.err
    assert "DEBUG" not in captured.out + captured.err
    print("after the run")  # and both are back
    os.write(2, b"stderr is back\n")
    captured = capfd.readouterr()
    assert captured.out == "after the run\n" and captured.err == "stderr is back\n"
    assert logging.getLogger().handlers == root_handlers and warnings.showwarning is showwarning


def test_stage_table_sums_each_stage_and_lists_those_not_run(tmp_path):
    out = io.StringIO()
    console = LineageConsole(tmp_path / "run.log", stream=out)
    with DagsterInstance.ephemeral() as instance:
        _run_toy(console, instance)
    table = console.stage_table().splitlines()
    console.close()
    rows = {line.split()[0]: line.split() for line in table[3:-1]}
    assert list(rows)[0] == "trained" and list(rows)[-1] == "promoted"  # as they started, then not run
    assert sorted(rows) == ["evaluated", "promoted", "trained", "trained_loss_went_down"]
    assert rows["trained"][1:3] == ["1", "done"] and rows["evaluated"][1:3] == ["1", "failed"]
    assert rows["promoted"][1:5] == ["0", "not", "run", "-"]
    assert table[-1].startswith("total (wall clock)")
    assert "## time per stage" in table[0]


def test_a_failure_outside_any_step_is_one_line_with_its_error(tmp_path):
    @resource
    def tracking(_) -> None:
        raise ConnectionError("the tracking server refused the connection\n(its details)")

    @asset(required_resource_keys={"tracking"})
    def tracked() -> int:
        return 1

    out = io.StringIO()
    console = LineageConsole(tmp_path / "run.log", stream=out)
    job = Definitions(assets=[tracked], resources={"tracking": tracking}, loggers=console.logger_defs(),
                      jobs=[define_asset_job("tracked_job")]).resolve_job_def("tracked_job")
    console.plan("tracked_job", ["tracked"])
    with DagsterInstance.ephemeral() as instance:
        assert not job.execute_in_process(instance=instance, run_config=console.run_config,
                                          raise_on_error=False).success
    console.close()
    lines = out.getvalue().splitlines()
    assert lines[0].strip().startswith("! tracked_job: Execution of run for \"tracked_job\" failed.")
    assert lines[0].endswith("ConnectionError: the tracking server refused the connection [...]")
    assert lines[1:] == [f"{' ' * 9}not run (tracked_job): tracked"]
    assert "(its details)" in (tmp_path / "run.log").read_text()


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("seconds_per_step", "every_s", "shown"), [
    (1.0, 30.0, [30, 60, 90]),  # fast steps: one line per 30 s at most
    (10.0, 30.0, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]),  # slow ones: one per 10% at most
    (1.0, 0.0, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]),
])
def test_training_progress_is_shown_at_most_every_30_s_and_every_10_percent(
        tmp_path, seconds_per_step, every_s, shown):
    clock = FakeClock()

    @asset
    def long_training(context) -> int:
        for step in range(1, 101):
            clock.now += seconds_per_step
            context.log.info(f"long_training step {step}/100: itc=2.000")
        return 1

    out = io.StringIO()
    console = LineageConsole(tmp_path / "run.log", stream=out, progress_every_s=every_s, clock=clock)
    job = Definitions(assets=[long_training], loggers=console.logger_defs(),
                      jobs=[define_asset_job("train_job")]).resolve_job_def("train_job")
    with DagsterInstance.ephemeral() as instance:
        assert job.execute_in_process(instance=instance, run_config=console.run_config).success
    console.close()
    text = out.getvalue()
    assert [int(s) for s in re.findall(r"long_training step (\d+)/100", text)] == shown
    assert len(_ends(text, "long_training")) == 1
    assert len(re.findall(r"long_training step", (tmp_path / "run.log").read_text())) == 100


def test_colours_only_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert LineageConsole(tmp_path / "a.log", stream=Terminal()).color
    assert not LineageConsole(tmp_path / "b.log", stream=io.StringIO()).color
    monkeypatch.setenv("NO_COLOR", "1")
    assert not LineageConsole(tmp_path / "c.log", stream=Terminal()).color
    out = Terminal()
    console = LineageConsole(tmp_path / "d.log", stream=out, color=True)
    with DagsterInstance.ephemeral() as instance:
        _run_toy(console, instance)
    console.close()
    assert "\033[32mdone\033[0m in" in out.getvalue() and "\033[31mFAILED\033[0m after" in out.getvalue()


DOWNSTREAM = ["pretrained_med", "captioner", "filter", "synthetic_captions", "bootstrapped_corpus",
              "bootstrapped_corpus_checks", "bootstrapped_med", "downstream_evals", "registered_model"]


@pytest.mark.slow  # shard runs and a main run through the console (about 10 s)
def test_lineage_console_over_shard_runs_and_the_main_run(tmp_path, tiny_world, capfd):
    storage = LocalStorage(root=str(tmp_path / "data"))
    storage.publish_dir(leaky_human_world(tmp_path, tiny_world), "landing")
    resources = build_resources(storage, str(tmp_path / "data"), launcher=LocalLauncher(), dvc_push=False)
    out = io.StringIO()
    console = LineageConsole(tmp_path / "data" / "logs" / "run.log", stream=out)
    with DagsterInstance.ephemeral() as instance:
        register_shards(instance, storage)
        with console.capture():
            result = materialize_lineage(instance, resources, TINY_RUN_CONFIG, console=console)
        main_events = {e.dagster_event.event_type for e in instance.all_logs(result.main_run.run_id)
                       if e.dagster_event}
    console.close()
    text, log = out.getvalue(), console.log_path.read_text()

    assert sorted(result.shard_runs) == ["00000.tar", "00001.tar"] and not result.success
    assert "[ 1/15] web_shards [00000.tar] ..." in text  # 2 x 2 shard steps + 11 in the main run
    for label in ("web_shards [00000.tar]", "web_shard_checks [00000.tar]", "web_shards [00001.tar]",
                  "web_shard_checks [00001.tar]", "human_pairs", "human_pairs_checks"):
        assert len(_starts(text, label)) == 1, (label, text)
        assert len(_ends(text, label)) == 1, (label, text)
    assert _ends(text, "human_pairs")[0].startswith("done in")
    failed = _ends(text, "human_pairs_checks")[0]
    assert failed.startswith("FAILED after") and "splits_disjoint" in failed and "\n" not in failed
    assert "! check human_pairs:splits_disjoint failed (ERROR, blocking)" in text
    assert f"not run (bootstrap_job): {', '.join(DOWNSTREAM)}" in text
    for noise in DAGSTER_NOISE:
        assert noise not in text, noise
    assert len(text.splitlines()) <= 12, text

    for job in ("web_shards_job", "bootstrap_job"):
        assert re.search(rf"DEBUG +\[dagster\] {job} - .* - LOADED_INPUT - ", log), job
    assert "Blocking check" in log or "blocking" in log.lower()
    assert DagsterEventType.LOADED_INPUT in main_events  # the instance (and so the UI) has every event
    captured = capfd.readouterr()
    assert "DEBUG" not in captured.out + captured.err and "STEP_START" not in captured.out + captured.err

    table = console.stage_table()
    assert re.search(r"^web_shards +2 +done ", table, flags=re.MULTILINE)
    assert re.search(r"^human_pairs_checks +1 +failed ", table, flags=re.MULTILINE)
    assert all(re.search(rf"^{name} +0 +not run +-$", table, flags=re.MULTILINE) for name in DOWNSTREAM)
    text = summary(storage, result, 1.0, log_path=console.log_path)
    assert text.splitlines()[-1] == f"full log: {console.log_path}" and "status: FAILED" in text


@pytest.mark.slow  # the main command in its own process (imports and the shard runs: about 40 s)
def test_main_command_prints_steps_table_and_summary_and_nothing_else(tmp_path, tiny_world):
    data = tmp_path / "data"
    LocalStorage(root=str(data)).publish_dir(leaky_human_world(tmp_path, tiny_world), "landing")
    config = tmp_path / "tiny.json"  # JSON is YAML
    config.write_text(json.dumps(TINY_RUN_CONFIG))
    command = [sys.executable, "-m", "orchestration.main", "--data", str(data), "--config", str(config)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    logs = sorted((data / "logs").glob("run-*.log"))
    assert len(logs) == 1
    assert lines[0] == f"full log (every Dagster event, the libraries' output): {logs[0]}"
    assert f"full log: {logs[0]}" in lines
    assert "[ 5/15] human_pairs ... done in" in proc.stdout and "## time per stage" in proc.stdout
    assert "status: FAILED" in proc.stdout and len(lines) < 60, proc.stdout
    for noise in DAGSTER_NOISE:
        assert noise not in proc.stdout, noise
    log = logs[0].read_text()
    assert " - STEP_INPUT - " in log and " - RESOURCE_INIT_STARTED - " in log
