"""Dataset versioning with the DVC CLI, as a Dagster resource.

The data folder is a DVC repository (``dvc init --no-scm``: its ``.dvc`` files describe the
data; the code's own git history is not involved). Each dataset an asset writes is ``dvc add``-ed
(hashed and committed to the cache) and ``dvc push``-ed to the remote: a local folder
(``DATA/dvc-remote`` by default) or an ``s3://`` URL (credentials from the usual AWS environment
variables or instance role, never written to the DVC config). The DVC hash (``md5`` of the file,
or ``<md5>.dir`` of a folder) goes into the asset's metadata and the MLflow run's inputs.

DVC locks its repository, so calls are serialised twice: assets that version data carry
``pool="dvc"`` (a Dagster concurrency pool with limit 1), and the resource holds a file lock
while it runs DVC (safe even without the pool, or from several processes).

The DVC CLI lives in its own tool environment (``uv tool install 'dvc[s3]'``): its antlr4
runtime conflicts with Dagster's. It is found via the ``dvc_bin`` setting, ``$DVC_BIN``, the
``PATH``, or ``~/.local/bin/dvc``, in that order.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from dagster import ConfigurableResource, InitResourceContext
from filelock import FileLock

DVC_POOL = "dvc"
"""Dagster concurrency pool of every asset that versions data (give it limit 1)."""
LOCK_FILE = ".blip-dvc.lock"
IGNORED = ("/dvc-remote/", "/mlflow/", "/dagster_home/", "/.work/", f"/{LOCK_FILE}")


class DvcError(RuntimeError):
    """A DVC command failed, or the DVC CLI is missing."""


def find_dvc(configured: str = "") -> str | None:
    """Path of the DVC executable, or None: ``configured``, ``$DVC_BIN``, ``PATH``, ``~/.local/bin``."""
    for candidate in (configured, os.environ.get("DVC_BIN", "")):
        if candidate:
            return candidate if Path(candidate).is_file() else shutil.which(candidate)
    found = shutil.which("dvc")
    if found:
        return found
    local = Path.home() / ".local" / "bin" / "dvc"
    return str(local) if local.is_file() else None


@dataclass(frozen=True)
class DvcVersion:
    """What DVC recorded for one dataset."""

    path: str  # dataset path relative to the repository root
    md5: str  # DVC hash: file md5, or "<md5>.dir" for a folder
    size: int  # bytes
    nfiles: int | None  # files in a folder (None for a file)
    dvc_file: str  # the .dvc file, relative to the repository root
    remote: str  # where it was pushed ("" when not pushed)

    def metadata(self) -> dict[str, Any]:
        """Asset metadata entries."""
        out: dict[str, Any] = {"dvc_md5": self.md5, "dvc_file": self.dvc_file, "dvc_size": self.size,
                               "dvc_remote": self.remote}
        if self.nfiles is not None:
            out["dvc_nfiles"] = self.nfiles
        return out


class DvcResource(ConfigurableResource):
    """Versions datasets in the data folder with DVC (see the module docstring)."""

    repo_dir: str = "data"  # DVC repository root: the data folder
    remote_url: str = ""  # "" -> <repo_dir>/dvc-remote; or s3://bucket/prefix
    remote_name: str = "storage"  # name of the default remote in .dvc/config
    endpoint_url: str = ""  # S3-compatible endpoint (MinIO, moto); "" -> AWS
    push: bool = True  # push every versioned dataset to the remote
    dvc_bin: str = ""  # DVC executable; "" -> $DVC_BIN, PATH, ~/.local/bin/dvc
    timeout_s: float = 1800.0  # per DVC command

    @property
    def root(self) -> Path:
        return Path(self.repo_dir).resolve()

    def resolved_remote(self) -> str:
        return self.remote_url or str(self.root / "dvc-remote")

    def executable(self) -> str:
        found = find_dvc(self.dvc_bin)
        if not found:
            raise DvcError("DVC CLI not found: run `make setup` (uv tool install 'dvc[s3]'), or set "
                           "DVC_BIN / the dvc_bin setting to its path")
        return found

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self.ensure_repo()

    # --- commands ----------------------------------------------------------------------------

    def run(self, *args: str) -> str:
        """Run ``dvc ARGS`` in the repository; its stdout. Raises :class:`DvcError` on failure."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}  # DVC has its own env
        env["DVC_NO_ANALYTICS"] = "1"
        if self.endpoint_url:  # also where s3:// sources are read from
            env.setdefault("AWS_ENDPOINT_URL", self.endpoint_url)
        cmd = [self.executable(), *args]
        proc = subprocess.run(cmd, cwd=self.root, env=env, capture_output=True, text=True,
                              timeout=self.timeout_s, check=False)
        if proc.returncode != 0:
            raise DvcError(f"`dvc {' '.join(args)}` failed ({proc.returncode}) in {self.root}:\n"
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def lock(self) -> FileLock:
        """Exclusive use of the DVC repository across threads and processes of this machine
        (``with resource.lock(): ...``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / LOCK_FILE)

    def ensure_repo(self) -> None:
        """Create the repository and point its default remote at ``resolved_remote()`` (idempotent).

        The remote goes straight into ``.dvc/config`` (INI, as ``dvc remote add`` writes it):
        one DVC start-up instead of three, and never any credential.
        """
        self.executable()
        with self.lock():
            if not (self.root / ".dvc").is_dir():
                self.run("init", "--no-scm", "-q")
                ignore = self.root / ".dvcignore"
                ignore.write_text(ignore.read_text() + "\n".join(IGNORED) + "\n")
            remote = self.resolved_remote()
            if "://" not in remote:
                Path(remote).mkdir(parents=True, exist_ok=True)
            wanted = {"url": remote, **({"endpointurl": self.endpoint_url} if self.endpoint_url else {})}
            parser = configparser.ConfigParser()
            config = self.root / ".dvc" / "config"
            parser.read(config)
            section = f'remote "{self.remote_name}"'
            core = {"analytics": "false", "remote": self.remote_name}
            if (parser.has_section(section) and dict(parser[section]) == wanted
                    and all(parser.get("core", k, fallback=None) == v for k, v in core.items())):
                return
            if not parser.has_section("core"):
                parser.add_section("core")
            parser["core"].update(core)
            parser[section] = wanted
            tmp = config.with_name(".config.tmp")
            with open(tmp, "w") as fh:
                parser.write(fh)
            tmp.replace(config)

    def version(self, source: str | os.PathLike[str], name: str | None = None) -> DvcVersion:
        """Version a dataset; its DVC hash.

        A path inside the repository is ``dvc add``-ed in place (and ``dvc push``-ed). An
        ``s3://`` URI or a path outside the repository is streamed straight to the remote
        (``dvc add --to-remote -o NAME``): only ``NAME.dvc`` is written locally.

        Args:
            name: where the dataset sits in the repository (default: its path there, or its
                last path component for an outside source).

        Raises:
            DvcError: DVC failed (the message carries its output).
        """
        text = str(source)
        external = text.startswith("s3://")
        if not external:
            target = Path(text).resolve()
            if not target.exists():
                raise FileNotFoundError(target)
            try:
                rel = target.relative_to(self.root)
            except ValueError:
                external = True
        if external:
            rel = Path(name or text.rstrip("/").rsplit("/", 1)[-1])
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"name {name!r} must be a relative path inside the repository")
        self.ensure_repo()
        dvc_file = rel.with_name(rel.name + ".dvc")
        with self.lock():
            if external:
                (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
                self.run("add", "-q", "--to-remote", "--remote", self.remote_name, "--out",
                         rel.as_posix(), text)
            else:
                self.run("add", "-q", rel.as_posix())
                if self.push:
                    self.run("push", "-q", "--remote", self.remote_name, dvc_file.as_posix())
        return self.read(dvc_file, pushed=self.push or external)

    def version_many(self, paths: Sequence[str | os.PathLike[str]]) -> list[DvcVersion]:
        """:meth:`version` of several datasets."""
        return [self.version(p) for p in paths]

    def read(self, dvc_file: str | os.PathLike[str], pushed: bool = False) -> DvcVersion:
        """The version a ``.dvc`` file records."""
        data = yaml.safe_load((self.root / dvc_file).read_text())
        out = data["outs"][0]
        return DvcVersion(
            path=(Path(dvc_file).parent / out["path"]).as_posix(),
            md5=out["md5"], size=int(out.get("size", 0)), nfiles=out.get("nfiles"),
            dvc_file=Path(dvc_file).as_posix(), remote=self.resolved_remote() if pushed else "",
        )

    def status(self) -> str:
        """``dvc status`` of the workspace (empty when everything is committed)."""
        with self.lock():
            return self.run("status")
