"""The main command's console: a line per step, training progress and warnings; the full log in a file.

:class:`LineageConsole` is a Dagster logger (:meth:`LineageConsole.logger_defs`, enabled per run by
:attr:`LineageConsole.run_config`) that writes every record of the runs, DEBUG included, to its
log file and prints only:

- one line per step as it starts and ends (``12:03:14 [ 3/15] pretrained_med ... done in 5 min 12 s``),
  the step's error on one line when it fails, and the steps a run did not reach;
- a training asset's ``step N/M`` messages, at most one per ``progress_every_s`` seconds and per
  ``progress_every`` of its steps;
- warnings and errors logged by the assets, and failed asset checks;

then :meth:`LineageConsole.stage_table`. While :meth:`LineageConsole.capture` is open, whatever
else reaches the process's stdout and stderr (library prints and warnings, progress bars,
subprocesses) and Python logging go to the log file. ANSI colours only on a terminal.
"""

import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

LOGGER_KEY = "blip_console"
PROGRESS = re.compile(r"\bstep (\d+)(?:/(\d+))?\b")
"""A progress message of a training asset (``pretrained_med step 120/600: itc=...``)."""
MAX_LINE = 240
FILE_FORMAT = "%(asctime)s %(levelname)-7s [%(name)s] %(message)s"
_COLORS = {"done": "32", "reused": "32", "FAILED": "31", "!": "33"}


@dataclass
class _Step:
    """One step of one run, as the console saw it."""

    key: str
    label: str
    number: int
    started: float
    shown_at: float  # when its last progress line (or start) was shown
    shown_fraction: float = 0.0
    seconds: float | None = None
    status: str = "running"  # running, done, reused, failed


@dataclass
class _Run:
    """One run: its planned steps and those that started."""

    job: str
    partition: str | None
    planned: list[str]
    started: float
    steps: dict[str, _Step] = field(default_factory=dict)
    failed: bool = False


def duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``5 min 12 s``, ``1 h 02 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def one_line_error(error: Any) -> str:
    """``ValueError: boom`` from a Dagster ``SerializableErrorInfo``: the user's exception (the
    first cause under Dagster's own wrappers), its first line only."""
    while error.cause is not None and (error.cls_name or "").startswith("Dagster"):
        error = error.cause
    name = error.cls_name or "error"
    lines = [line.strip() for line in (error.message or "").splitlines() if line.strip()]
    used = 2 if len(lines) > 1 and lines[0].endswith(":") else 1  # "... failed:" names them next
    text = " ".join(lines[:used]) if lines else name
    head, sep, rest = text.partition(": ")
    if sep and head.rsplit(".", 1)[-1] == name:
        text = f"{name}: {rest}"  # dagster._core.errors.X: ... -> X: ...
    return _clip(text, more=len(lines) > used)


def _clip(text: str, more: bool = False) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    if len(first) > MAX_LINE:
        first, more = first[:MAX_LINE].rstrip(), True
    return f"{first} [...]" if more or "\n" in text.strip() else first


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: "LineageConsole") -> None:
        super().__init__(logging.DEBUG)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.handle(record)
        except Exception:  # a console glitch must not fail a run
            self.handleError(record)


class LineageConsole:
    """The console of a lineage materialization, and its log file.

    Args:
        log_path: The log file (appended to; its folder is created).
        stream: Where the console writes (default: the process's stdout, which
            :meth:`capture` keeps for it).
        color: ANSI colours (default: when the console is a terminal and ``NO_COLOR`` is unset).
        progress_every_s: Least seconds between two progress lines of a step.
        progress_every: Least share of a training between two progress lines (0.1: every 10%).
        clock: Seconds, monotonic (tests pass their own).
    """

    def __init__(self, log_path: Path, stream: TextIO | None = None, color: bool | None = None,
                 progress_every_s: float = 30.0, progress_every: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = stream
        self._captured_out: TextIO | None = None
        if color is None:
            out = stream or sys.stdout
            color = bool(getattr(out, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ \
                and os.environ.get("TERM") != "dumb"
        self.color = color
        self.progress_every_s, self.progress_every, self.clock = progress_every_s, progress_every, clock
        self.file_handler = logging.FileHandler(self.log_path, encoding="utf-8")
        self.file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
        self.logger = logging.Logger("dagster", logging.DEBUG)  # not in logging's tree: no propagation
        self.logger.addHandler(self.file_handler)
        self.logger.addHandler(_ConsoleHandler(self))
        self._planned: dict[tuple[str, str | None], list[str]] = {}
        self._total = 0
        self._count = 0
        self._runs: dict[str, _Run] = {}
        self._open: tuple[int, str] | None = None  # (run, step) whose start line awaits its end
        self._first_start: float | None = None
        self._last_end: float | None = None

    @property
    def run_config(self) -> dict[str, Any]:
        """The run config part that enables this logger (and so replaces Dagster's console logger)."""
        return {"loggers": {LOGGER_KEY: {}}}

    def logger_defs(self) -> dict[str, Any]:
        """``{LOGGER_KEY: LoggerDefinition}`` for ``Definitions(loggers=...)``."""
        from dagster import LoggerDefinition

        return {LOGGER_KEY: LoggerDefinition(lambda _: self.logger,
                                             description="blip-ops console and log file")}

    def plan(self, job: str, steps: Sequence[str], partition: str | None = None) -> None:
        """Announces a run about to start (numbers steps over the lineage, finds those not reached)."""
        self._planned[(job, partition)] = list(steps)
        self._total += len(steps)

    def _warning_to_log(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                        file: TextIO | None = None, line: str | None = None) -> None:
        """``warnings.showwarning`` while capturing: the warning goes to the log file."""
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        self.file_handler.handle(logging.LogRecord("py.warnings", logging.WARNING, filename, lineno, text,
                                                   None, None))

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Sends the process's stdout and stderr (file descriptors 1 and 2, and ``sys.stdout`` and
        ``sys.stderr`` with them), Python logging (INFO and up) and warnings to the log file
        meanwhile; the console keeps the original stdout."""
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if self._stream is None:
            self._captured_out = os.fdopen(os.dup(1), "w", buffering=1, errors="replace", encoding=encoding)
        saved_fds, saved_sys = [os.dup(1), os.dup(2)], (sys.stdout, sys.stderr)
        root = logging.getLogger()
        root_level = root.level
        root.addHandler(self.file_handler)
        root.setLevel(min(root_level or logging.WARNING, logging.INFO))
        showwarning = warnings.showwarning
        warnings.showwarning = self._warning_to_log  # not via logging: a library may disable py.warnings
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        # sys.stdout and sys.stderr may not write to 1 and 2 (pytest, notebooks): these do
        wrappers = [open(n, "w", buffering=1, encoding=encoding, errors="replace", closefd=False)
                    for n in (1, 2)]
        sys.stdout, sys.stderr = wrappers
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr, *wrappers):
                stream.flush()
            sys.stdout, sys.stderr = saved_sys
            for wrapper in wrappers:
                wrapper.close()
            for n, saved in enumerate(saved_fds, start=1):
                os.dup2(saved, n)
                os.close(saved)
            warnings.showwarning = showwarning
            root.removeHandler(self.file_handler)
            root.setLevel(root_level)
            self._end_open_line()
            if self._captured_out is not None:
                self._captured_out.close()
                self._captured_out = None

    def close(self) -> None:
        """Ends an open line and closes the log file."""
        self._end_open_line()
        self.logger.removeHandler(self.file_handler)
        self.file_handler.close()

    def handle(self, record: logging.LogRecord) -> None:
        """Shows what a person should see of one Dagster log record (all of them are in the file)."""
        from dagster import DagsterEventType as E

        meta: Mapping[str, Any] = record.__dict__.get("dagster_meta") or {}
        event = meta.get("dagster_event")
        kind = event.event_type if event is not None else None
        run = self._runs.get(meta.get("run_id") or "")
        step = run.steps.get(meta.get("step_key") or "") if run else None
        if kind == E.RUN_START:
            self._run_start(meta)
        elif run is None:
            if record.levelno >= logging.WARNING:
                self._warn(meta.get("job_name") or "dagster", meta.get("orig_message") or record.getMessage())
        elif kind == E.STEP_START:
            self._step_start(run, meta["step_key"])
        elif step is not None and kind in (E.STEP_SUCCESS, E.STEP_FAILURE):
            self._step_end(run, step, event)
        elif step is not None and kind == E.ASSET_MATERIALIZATION:
            reused = event.event_specific_data.materialization.metadata.get("reused")
            if getattr(reused, "value", reused) is True:
                step.status = "reused"
        elif kind == E.ASSET_CHECK_EVALUATION:
            self._check(run, event.event_specific_data)
        elif kind in (E.RUN_SUCCESS, E.RUN_FAILURE, E.RUN_CANCELED):
            self._run_end(run, meta, event, record.levelno)
        elif step is not None and event is None and record.levelno == logging.INFO:
            self._progress(step, meta.get("orig_message") or "")
        elif record.levelno >= logging.WARNING and (step is not None or not meta.get("step_key")):
            # a step that never started logs only why it did not ("Dependencies ... failed"),
            # which the run's end sums up as "not run"
            self._warn(step.label if step else run.job, meta.get("orig_message") or record.getMessage(),
                       event)

    def stage_table(self) -> str:
        """Time per stage (step) over the runs, in the order they started, then the steps not run."""
        order: dict[str, list[_Step | None]] = {}
        for run in self._runs.values():
            for s in run.steps.values():
                order.setdefault(s.key, []).append(s)
        for run in self._runs.values():
            for key in run.planned:
                if key not in run.steps:
                    order.setdefault(key, []).append(None)
        if not order:
            return "## time per stage\n(no step ran)"
        rows = []
        for key, steps in order.items():
            done = [s for s in steps if s is not None]
            seconds = sum(s.seconds or 0.0 for s in done)
            statuses = Counter(s.status if s is not None else "not run" for s in steps)
            result = next(iter(statuses)) if len(statuses) == 1 else \
                ", ".join(f"{n} {status}" for status, n in statuses.items())
            rows.append((key, len(done), result, seconds))
        wall = (self._last_end or self.clock()) - (self._first_start or self.clock())
        width = max(len("stage"), *(len(r[0]) for r in rows))
        rwidth = max(len("result"), *(len(r[2]) for r in rows))
        lines = ["## time per stage", "",
                 f"{'stage':<{width}}  runs  {'result':<{rwidth}}  {'time':>11}  share"]
        for key, runs, result, seconds in rows:
            share = f"{100 * seconds / wall:4.0f}%" if wall > 0 and runs else ""
            lines.append(f"{key:<{width}}  {runs:>4}  {result:<{rwidth}}  "
                         f"{duration(seconds) if runs else '-':>11}  {share:>5}".rstrip())
        lines.append(f"{'total (wall clock)':<{width + 8 + rwidth}}  {duration(wall):>11}")
        return "\n".join(lines)

    def _run_start(self, meta: Mapping[str, Any]) -> None:
        job, partition = meta.get("job_name") or "", (meta.get("job_tags") or {}).get("dagster/partition")
        planned = self._planned.pop((job, partition), [])
        now = self.clock()
        self._runs[meta["run_id"]] = _Run(job, partition, planned, now)
        if self._first_start is None:
            self._first_start = now

    def _step_start(self, run: _Run, key: str) -> None:
        self._count += 1
        now = self.clock()
        label = f"{key} [{run.partition}]" if run.partition else key
        step = run.steps[key] = _Step(key, label, self._count, now, now)
        self._line(f"{self._clock()} {self._number(step)} {label} ...", end="")
        self._open = (id(run), key)

    def _step_end(self, run: _Run, step: _Step, event: Any) -> None:
        step.seconds = self.clock() - step.started
        if event.is_step_failure:
            step.status, run.failed = "failed", True
            tail = f"{self._paint('FAILED')} after {duration(step.seconds)}: " \
                   f"{one_line_error(event.step_failure_data.error)}"
        else:
            step.status = "reused" if step.status == "reused" else "done"
            tail = f"{self._paint('done')} in {duration(step.seconds)}" + \
                (" (reused)" if step.status == "reused" else "")
        if self._open == (id(run), step.key):
            self._open = None
            self._write(f" {tail}\n")
        else:
            self._line(f"{self._clock()} {self._number(step)} {step.label} {tail}")

    def _progress(self, step: _Step, message: str) -> None:
        match = PROGRESS.search(message)
        if match is None:
            return
        now = self.clock()
        fraction = int(match[1]) / int(match[2]) if match[2] and int(match[2]) > 0 else None
        if now - step.shown_at < self.progress_every_s:
            return
        if fraction is not None and self._share(fraction) <= self._share(step.shown_fraction):
            return
        step.shown_at, step.shown_fraction = now, fraction if fraction is not None else step.shown_fraction
        self._line(f"{' ' * 9}{_clip(message)}  ({duration(now - step.started)} in)")

    def _share(self, fraction: float) -> float:
        """How many ``progress_every`` of its training a step is through (the fraction if 0)."""
        return int(fraction / self.progress_every + 1e-9) if self.progress_every > 0 else fraction

    def _check(self, run: _Run, evaluation: Any) -> None:
        if evaluation.passed:
            return
        where = f" [{run.partition}]" if run.partition else ""
        severity = getattr(evaluation.severity, "value", evaluation.severity)
        blocking = ", blocking" if evaluation.blocking else ""
        why = f": {evaluation.description}" if evaluation.description else ""
        self._line(f"{' ' * 9}{self._paint('!')} check {evaluation.asset_key.to_user_string()}:"
                   f"{evaluation.check_name}{where} failed ({severity}{blocking}){_clip(why)}")

    def _run_end(self, run: _Run, meta: Mapping[str, Any], event: Any, level: int) -> None:
        self._last_end = self.clock()
        missing = [key for key in run.planned if key not in run.steps]
        where = f"{run.job} [{run.partition}]" if run.partition else run.job
        if level >= logging.WARNING and not run.failed:  # a failure outside any step
            self._warn(where, meta.get("orig_message") or "", event)
        if missing:
            self._line(f"{' ' * 9}not run ({where}): {', '.join(missing)}")

    def _warn(self, where: str, message: str, event: Any = None) -> None:
        error = getattr(getattr(event, "event_specific_data", None), "error", None) if event else None
        text = _clip(message)
        if error is not None:
            text += f"{' ' if text.endswith('.') else ': '}{one_line_error(error)}"
        self._line(f"{' ' * 9}{self._paint('!')} {where}: {text}")

    def _number(self, step: _Step) -> str:
        total = max(self._total, self._count)
        return f"[{step.number:>{len(str(total))}}/{total}]"

    def _clock(self) -> str:
        return time.strftime("%H:%M:%S")

    def _paint(self, word: str) -> str:
        return f"\033[{_COLORS[word]}m{word}\033[0m" if self.color and word in _COLORS else word

    def _end_open_line(self) -> None:
        if self._open is not None:
            self._open = None
            self._write("\n")

    def _line(self, text: str, end: str = "\n") -> None:
        self._end_open_line()
        self._write(text + end)

    def _write(self, text: str) -> None:
        out = self._stream or self._captured_out or sys.stdout
        out.write(text)
        out.flush()
