"""Where the pipeline's data lives: a local folder or an S3 prefix, behind one interface.

Keys are ``/``-separated relative paths (``assets/pretrained_med``, ``landing/web/00000.tar``).
A *dataset* is a folder published under a key with a completion marker (``.complete.json``,
holding the folder's content hash) written LAST: readers treat a key without its marker as
absent, so nothing half-written or half-uploaded is ever read as done. Landing areas, filled
by other tools, are plain files read without a marker: :meth:`StorageResource.list_stats` gives
each one's size and content version (``resources.landing`` decides when it is complete), and
the pipeline only ever adds files there (:meth:`StorageResource.publish_new_files`).

- :class:`LocalStorage` keeps everything under ``root``; datasets appear by atomic rename.
- :class:`S3Storage` keeps everything under ``s3://bucket/prefix/``; reads go through a local
  cache keyed by the marker's hash, so an unchanged dataset is downloaded once. Credentials
  come only from the standard boto3 chain (environment, profile, instance role); the endpoint
  from ``endpoint_url`` or ``AWS_ENDPOINT_URL``.

The data version of a dataset is its ``blip_core.io.tree_hash``, the same on both backends.
"""


import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dagster import (
    ConfigurableIOManager,
    ConfigurableResource,
    InputContext,
    OutputContext,
    ResourceDependency,
)
from pydantic import Field, PrivateAttr

from blip_core.io import atomic_dir, atomic_write_json, remove_leftovers_of, safe_member_path, tree_hash

MARKER = ".complete.json"
"""Completion marker of a published dataset (hidden: ``tree_hash`` ignores it)."""


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and the cause."""


@dataclass(frozen=True)
class FileStat:
    """What identifies the content of a plain file: its size and a token rewriting changes."""

    size: int
    mtime: float  # seconds since the epoch (S3: LastModified)
    token: str  # local: the modification time in ns; S3: the ETag

    @property
    def version(self) -> str:
        """The content version: size and token (a rewritten file gets a new one)."""
        return f"{self.size}-{self.token}"


def _check_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or ".." in parts or "\\" in key:
        raise ValueError(f"bad storage key {key!r}: relative, '/'-separated, no '..'")
    return key.strip("/")


def _files(root: Path) -> list[Path]:
    """Regular files under ``root`` (relative), hidden ones skipped, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root)
            if not name.startswith("."):
                out.append(rel)
    return sorted(out)


def _fill(src: Path, dest: Path, move: bool, exclude: tuple[str, ...]) -> None:
    """Copies (or moves) the top-level entries of ``src`` into ``dest``, except ``exclude``."""
    if not src.is_dir():
        raise StorageError(f"{src}: not a folder")
    for entry in sorted(src.iterdir()):
        if entry.name in exclude or entry.name.startswith("."):
            continue
        if move:
            shutil.move(entry, dest / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, dest / entry.name)
        else:
            shutil.copy2(entry, dest / entry.name)


def _marker_for(folder: Path) -> dict[str, Any]:
    files = _files(folder)
    return {
        "tree_hash": tree_hash(folder),
        "files": len(files),
        "bytes": sum((folder / f).stat().st_size for f in files),
    }


class StorageResource(ConfigurableResource):
    """The interface every backend implements (assets depend on this type)."""

    def uri(self, key: str) -> str:
        """A human-readable address of ``key`` (a path or ``s3://`` URI)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        """Whether a dataset was completely published under ``key``."""
        return self.marker(key) is not None

    def marker(self, key: str) -> dict[str, Any] | None:
        """The completion marker of the dataset under ``key``, or None when incomplete/absent."""
        raise NotImplementedError

    def version(self, key: str) -> str:
        """The content hash of the dataset under ``key``; raises if it is not published."""
        marker = self.marker(key)
        if marker is None:
            raise StorageError(f"{self.uri(key)}: no complete dataset (missing {MARKER})")
        return str(marker["tree_hash"])

    def local_dir(self, key: str, complete_only: bool = True) -> contextlib.AbstractContextManager[Path]:
        """A local folder holding the dataset under ``key`` (read it, do not modify it).

        Args:
            key: Dataset key.
            complete_only: Refuse a key without its completion marker (landing areas: False).
        """
        raise NotImplementedError

    def local_file(self, key: str) -> contextlib.AbstractContextManager[Path]:
        """A local copy of one file (landing-area shards)."""
        raise NotImplementedError

    def list_files(self, key: str, suffix: str = "") -> list[str]:
        """Names (not keys) of the files directly under ``key`` ending in ``suffix``, sorted."""
        raise NotImplementedError

    def list_stats(self, key: str) -> dict[str, FileStat]:
        """The files directly under ``key`` (hidden ones skipped) by name, with their stat."""
        raise NotImplementedError

    def stat(self, key: str) -> FileStat | None:
        """The stat of the file ``key``, or None when there is none."""
        raise NotImplementedError

    def read_tail(self, key: str, size: int) -> bytes:
        """The last ``size`` bytes of the file ``key`` (all of it when shorter)."""
        raise NotImplementedError

    def publish_new_files(self, local: str | os.PathLike[str], key: str) -> tuple[list[str], list[str]]:
        """Copies each file under the local folder to ``key/<relative path>`` unless one is there.

        Never overwrites: each file appears at once, complete, only where nothing was (a file
        landed meanwhile wins). Files are written in sorted order (``00000.tar`` before
        ``00000_stats.json``). Hidden files are skipped.

        Returns:
            The keys written and the keys left as they were.
        """
        raise NotImplementedError

    def publish_dir(self, local: str | os.PathLike[str], key: str, move: bool = False,
                    exclude: tuple[str, ...] = (), info: dict[str, Any] | None = None) -> str:
        """Publishes a local folder as the dataset ``key`` (replacing any older one).

        Args:
            local: Folder to publish.
            key: Destination key.
            move: The caller gives ``local`` away (local backend: renamed, not copied).
            exclude: Top-level entries of ``local`` not to publish (``trainer_state``).
            info: Extra JSON fields for the marker (what produced the data), not hashed.

        Returns:
            The dataset's content hash.
        """
        raise NotImplementedError

    def scratch_dir(self, key: str) -> Path:
        """A persistent local work folder for ``key`` (resumable training lives here)."""
        raise NotImplementedError

    def read_json(self, key: str) -> Any:
        """The JSON document stored at ``key`` (a file)."""
        with self.local_file(key) as path:
            return json.loads(path.read_text(encoding="utf-8"))

    def write_json(self, key: str, obj: Any) -> None:
        """Stores ``obj`` as a JSON file at ``key`` (atomically)."""
        raise NotImplementedError


class LocalStorage(StorageResource):
    """Datasets as folders under ``root`` (default: the project's ignored ``data/`` folder)."""

    root: str = Field(default="data", description="folder holding landing areas and datasets")

    def path(self, key: str) -> Path:
        """The local path of ``key``."""
        return Path(self.root).resolve() / _check_key(key)

    def uri(self, key: str) -> str:
        return str(self.path(key))

    def marker(self, key: str) -> dict[str, Any] | None:
        path = self.path(key) / MARKER
        return json.loads(path.read_text()) if path.is_file() else None

    @contextlib.contextmanager
    def local_dir(self, key: str, complete_only: bool = True) -> Iterator[Path]:
        path = self.path(key)
        if complete_only and not self.exists(key):
            raise StorageError(f"{path}: no complete dataset (missing {MARKER})")
        if not path.is_dir():
            raise StorageError(f"{path}: no such folder")
        yield path

    @contextlib.contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        path = self.path(key)
        if not path.is_file():
            raise StorageError(f"{path}: no such file")
        yield path

    def list_files(self, key: str, suffix: str = "") -> list[str]:
        path = self.path(key)
        if not path.is_dir():
            return []
        return sorted(p.name for p in path.iterdir()
                      if p.is_file() and p.name.endswith(suffix) and not p.name.startswith("."))

    def list_stats(self, key: str) -> dict[str, FileStat]:
        out = {}
        for name in self.list_files(key):
            st = self.stat(f"{_check_key(key)}/{name}")
            if st is not None:  # None: removed since the listing
                out[name] = st
        return out

    def stat(self, key: str) -> FileStat | None:
        try:
            st = self.path(key).stat()
        except FileNotFoundError:
            return None
        return FileStat(size=st.st_size, mtime=st.st_mtime, token=str(st.st_mtime_ns))

    def read_tail(self, key: str, size: int) -> bytes:
        with open(self.path(key), "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - size))
            return f.read(size)

    def publish_new_files(self, local: str | os.PathLike[str], key: str) -> tuple[list[str], list[str]]:
        written, kept = [], []
        for rel in _files(Path(local)):
            dest_key = f"{_check_key(key)}/{rel.as_posix()}"
            dest = self.path(dest_key)
            if dest.exists():
                kept.append(dest_key)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
            os.close(fd)
            try:
                shutil.copy2(Path(local) / rel, tmp)
                try:
                    os.link(tmp, dest)  # atomic, and fails where a file exists
                except FileExistsError:
                    kept.append(dest_key)
                    continue
                except OSError:  # a file system without hard links
                    if dest.exists():
                        kept.append(dest_key)
                        continue
                    os.rename(tmp, dest)
                written.append(dest_key)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return written, kept

    def publish_dir(self, local: str | os.PathLike[str], key: str, move: bool = False,
                    exclude: tuple[str, ...] = (), info: dict[str, Any] | None = None) -> str:
        with atomic_dir(self.path(key)) as tmp:
            _fill(Path(local), tmp, move, exclude)
            marker = _marker_for(tmp) | (info or {})
            atomic_write_json(tmp / MARKER, marker)
        remove_leftovers_of(self.path(key))
        return str(marker["tree_hash"])

    def scratch_dir(self, key: str) -> Path:
        path = Path(self.root).resolve() / ".work" / _check_key(key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_json(self, key: str, obj: Any) -> None:
        atomic_write_json(self.path(key), obj)


def _default_cache() -> str:
    return os.environ.get("BLIP_OPS_CACHE", str(Path(tempfile.gettempdir()) / "blip-ops-s3-cache"))


class S3Storage(StorageResource):
    """Datasets under ``s3://bucket/prefix/`` (AWS or any S3-compatible endpoint)."""

    bucket: str = Field(description="bucket name")
    prefix: str = Field(default="blip-ops", description="key prefix inside the bucket")
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; default: AWS_ENDPOINT_URL or AWS"
    )
    region: str | None = Field(default=None, description="region; default: the boto3 chain")
    cache_dir: str = Field(default_factory=_default_cache,
                           description="local cache of downloaded datasets and work folders")
    max_attempts: int = Field(
        default=10, description="attempts per request, the first included; retries back off "
        "exponentially with jitter (botocore standard mode: 10 attempts ride out ~10-15 s of refused "
        "connections; each slow answer costs read_timeout_s)")
    connect_timeout_s: float = Field(default=10.0, description="seconds to open a connection")
    read_timeout_s: float = Field(default=60.0, description="seconds to wait for a response")

    _client: Any = PrivateAttr(default=None)

    @property
    def client(self) -> Any:
        """The boto3 S3 client (standard retry mode with exponential backoff)."""
        if self._client is None:
            import boto3
            from botocore.config import Config as BotoConfig

            cfg = BotoConfig(retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
                             connect_timeout=self.connect_timeout_s, read_timeout=self.read_timeout_s)
            endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, region_name=self.region, config=cfg
            )
        return self._client

    def _key(self, key: str) -> str:
        return "/".join(p for p in (self.prefix.strip("/"), _check_key(key)) if p)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextlib.contextmanager
    def _errors(self, what: str, key: str) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as EndpointError

        try:
            yield
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            raise StorageError(f"{what} {self.uri(key)} failed: {code}: {e}") from e
        except (EndpointError, HTTPClientError) as e:  # refused, reset, timed out: retried
            raise StorageError(f"{what} {self.uri(key)} failed: endpoint unreachable or too slow "
                               f"after up to {self.max_attempts} attempts with backoff: {e}") from e
        except (BotoCoreError, Boto3Error) as e:  # Boto3Error: S3UploadFailedError wraps ClientError
            raise StorageError(f"{what} {self.uri(key)} failed: {e}") from e

    def _get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors("get", key):
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return obj["Body"].read()

    def _list(self, key: str) -> list[dict[str, Any]]:
        """Every object under the folder ``key`` (recursive)."""
        prefix = self._key(key).rstrip("/") + "/"
        out: list[dict[str, Any]] = []
        with self._errors("list", key):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                out.extend(page.get("Contents", []))
        for obj in out:
            obj["Rel"] = obj["Key"][len(prefix):]
        return out

    def marker(self, key: str) -> dict[str, Any] | None:
        data = self._get_bytes(f"{_check_key(key)}/{MARKER}")
        return None if data is None else json.loads(data)

    def _cache_path(self, *parts: str) -> Path:
        root = Path(self.cache_dir).resolve()
        inside = "/".join(p.strip("/") for p in (self.bucket, self.prefix, *parts) if p.strip("/"))
        return safe_member_path(root, inside)  # a bucket, prefix or key with '..' cannot climb out

    @contextlib.contextmanager
    def local_dir(self, key: str, complete_only: bool = True) -> Iterator[Path]:
        marker = self.marker(key)
        if complete_only and marker is None:
            raise StorageError(f"{self.uri(key)}: no complete dataset (missing {MARKER})")
        cached = self._cache_path("datasets", _check_key(key))
        if marker is not None and (cached / MARKER).is_file() and \
                json.loads((cached / MARKER).read_text()) == marker:
            yield cached
            return
        objects = [o for o in self._list(key) if o["Rel"] and o["Rel"] != MARKER]
        if not objects and marker is None:
            raise StorageError(f"{self.uri(key)}: no such folder")
        with atomic_dir(cached) as tmp:
            for obj in objects:
                try:  # an object key is data from the bucket: it may not leave the folder
                    dest = safe_member_path(tmp, obj["Rel"])
                except ValueError:
                    raise StorageError(f"{self.uri(key)}: refusing object {obj['Key']!r}: its name "
                                       "leaves the dataset folder") from None
                dest.parent.mkdir(parents=True, exist_ok=True)
                with self._errors("download", f"{key}/{obj['Rel']}"):
                    self.client.download_file(self.bucket, obj["Key"], str(dest))
            if marker is not None:
                got = tree_hash(tmp)
                if got != marker["tree_hash"]:
                    raise StorageError(
                        f"{self.uri(key)}: downloaded content hash {got} != marker "
                        f"{marker['tree_hash']} (rewritten while reading? try again)"
                    )
                atomic_write_json(tmp / MARKER, marker)
        remove_leftovers_of(cached)
        yield cached

    @contextlib.contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        dest = self._cache_path("files", _check_key(key))
        dest.parent.mkdir(parents=True, exist_ok=True)
        head = self._head(key)
        if head is None:
            raise StorageError(f"{self.uri(key)}: no such file")
        etag = dest.with_name(f".{dest.name}.etag")
        if not (dest.is_file() and etag.is_file() and etag.read_text() == head["ETag"]):
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
            os.close(fd)
            try:
                with self._errors("download", key):
                    self.client.download_file(self.bucket, self._key(key), tmp)
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            etag.write_text(head["ETag"])
        yield dest

    def list_files(self, key: str, suffix: str = "") -> list[str]:
        names = [o["Rel"] for o in self._list(key)]
        return sorted(n for n in names
                      if n and "/" not in n and n.endswith(suffix) and not n.startswith("."))

    @staticmethod
    def _file_stat(size: int, last_modified: Any, etag: str) -> FileStat:
        return FileStat(size=int(size), mtime=last_modified.timestamp(), token=etag.strip('"'))

    def list_stats(self, key: str) -> dict[str, FileStat]:
        return {o["Rel"]: self._file_stat(o["Size"], o["LastModified"], o["ETag"])
                for o in sorted(self._list(key), key=lambda o: o["Rel"])
                if o["Rel"] and "/" not in o["Rel"] and not o["Rel"].startswith(".")}

    def stat(self, key: str) -> FileStat | None:
        head = self._head(key)
        return None if head is None else self._file_stat(head["ContentLength"], head["LastModified"],
                                                         head["ETag"])

    def _head(self, key: str) -> dict[str, Any] | None:
        """The object's HEAD response, or None when there is no such object."""
        from botocore.exceptions import ClientError

        with self._errors("head", key):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

    def read_tail(self, key: str, size: int) -> bytes:
        from botocore.exceptions import ClientError

        with self._errors("get", key):
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes=-{size}")
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "InvalidRange":  # an empty object
                    return b""
                raise
            return obj["Body"].read()

    def publish_new_files(self, local: str | os.PathLike[str], key: str) -> tuple[list[str], list[str]]:
        """See :meth:`StorageResource.publish_new_files` (one PUT per file: up to 5 GB each)."""
        from botocore.exceptions import ClientError

        written, kept = [], []
        for rel in _files(Path(local)):
            dest_key = f"{_check_key(key)}/{rel.as_posix()}"
            if self.stat(dest_key) is not None:
                kept.append(dest_key)
                continue
            with self._errors("upload", dest_key), open(Path(local) / rel, "rb") as body:
                try:  # If-None-Match: the endpoint refuses to replace an object landed meanwhile
                    self.client.put_object(Bucket=self.bucket, Key=self._key(dest_key), Body=body,
                                           IfNoneMatch="*")
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed",
                                                                       "ConditionalRequestConflict"):
                        raise
                    kept.append(dest_key)
                    continue
            written.append(dest_key)
        return written, kept

    def publish_dir(self, local: str | os.PathLike[str], key: str, move: bool = False,
                    exclude: tuple[str, ...] = (), info: dict[str, Any] | None = None) -> str:
        # The cached copy is built first; it is exactly what gets uploaded and hashed.
        with atomic_dir(self._cache_path("datasets", _check_key(key))) as view:
            _fill(Path(local), view, move, exclude)
            marker = _marker_for(view) | (info or {})
            files = _files(view)
            # 1. the old marker goes first: from now on readers see "incomplete";
            with self._errors("delete", f"{key}/{MARKER}"):
                self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{key}/{MARKER}"))
            # 2. the files; 3. stale objects of an older version; 4. the marker, last.
            for f in files:
                rel = f.as_posix()
                with self._errors("upload", f"{key}/{rel}"):
                    self.client.upload_file(str(view / f), self.bucket, self._key(f"{key}/{rel}"))
            wanted = {f.as_posix() for f in files} | {MARKER}
            stale = [o["Key"] for o in self._list(key) if o["Rel"] not in wanted]
            for i in range(0, len(stale), 1000):
                with self._errors("delete", key):
                    self.client.delete_objects(Bucket=self.bucket, Delete={
                        "Objects": [{"Key": k} for k in stale[i:i + 1000]], "Quiet": True})
            with self._errors("upload", f"{key}/{MARKER}"):
                self.client.put_object(Bucket=self.bucket, Key=self._key(f"{key}/{MARKER}"),
                                       Body=json.dumps(marker).encode(),
                                       ContentType="application/json")
            atomic_write_json(view / MARKER, marker)
        remove_leftovers_of(self._cache_path("datasets", _check_key(key)))
        return str(marker["tree_hash"])

    def scratch_dir(self, key: str) -> Path:
        path = self._cache_path("work", _check_key(key))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_json(self, key: str, obj: Any) -> None:
        with self._errors("upload", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key),
                                   Body=json.dumps(obj, indent=2).encode(),
                                   ContentType="application/json")


def storage_from_env(default_root: str = "data") -> StorageResource:
    """The storage a deployment asks for through the environment.

    ``BLIP_OPS_STORAGE=s3`` selects :class:`S3Storage` (``BLIP_OPS_S3_BUCKET``,
    ``BLIP_OPS_S3_PREFIX``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``); anything else
    :class:`LocalStorage` rooted at ``BLIP_OPS_DATA`` (default ``default_root``).
    """
    if os.environ.get("BLIP_OPS_STORAGE", "local").lower() == "s3":
        bucket = os.environ.get("BLIP_OPS_S3_BUCKET")
        if not bucket:
            raise StorageError("BLIP_OPS_STORAGE=s3 needs BLIP_OPS_S3_BUCKET")
        return S3Storage(
            bucket=bucket,
            prefix=os.environ.get("BLIP_OPS_S3_PREFIX", "blip-ops"),
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
        )
    return LocalStorage(root=os.environ.get("BLIP_OPS_DATA", default_root))


# --------------------------------------------------------------------------------------------
# Passing datasets between assets


@dataclass(frozen=True)
class Dataset:
    """A published dataset, as one asset hands it to the next."""

    key: str  # storage key
    uri: str  # where it lives (path or s3:// URI)
    version: str  # content hash (the Dagster data version)


def dataset_key(asset_path: Sequence[str], partition: str | None = None) -> str:
    """Storage key of an asset's output: ``assets/<asset>[/<partition>]``."""
    parts = ["assets", *asset_path]
    if partition is not None:
        parts.append(partition.replace("/", "_"))
    return "/".join(parts)


class DatasetIOManager(ConfigurableIOManager):
    """Hands :class:`Dataset` references between assets; the data itself is on the storage.

    Assets publish their folder under :func:`dataset_key` and return its :class:`Dataset`; an
    input is the upstream's reference (a ``{partition: Dataset}`` dict for a partitioned
    upstream), read from its completion marker, so only completely published data flows on.
    """

    storage: ResourceDependency[StorageResource]

    def handle_output(self, context: OutputContext, obj: Dataset) -> None:
        partition = context.partition_key if context.has_partition_key else None
        expected = dataset_key(context.asset_key.path, partition)
        if not isinstance(obj, Dataset) or obj.key != expected:
            raise StorageError(f"{context.asset_key.to_user_string()} must return the Dataset "
                               f"published at {expected!r}, got {obj!r}")
        if not self.storage.exists(obj.key):
            raise StorageError(f"{obj.uri}: returned but not published")

    def load_input(self, context: InputContext) -> Dataset | dict[str, Dataset]:
        """The upstream's Dataset; for a partitioned upstream, those of its published partitions
        (a partition that was never published is absent: the asset reading it says so)."""
        path = context.asset_key.path
        if context.has_asset_partitions:
            keys = {pk: dataset_key(path, pk) for pk in context.asset_partition_keys}
            return {pk: self._load(key) for pk, key in keys.items() if self.storage.exists(key)}
        return self._load(dataset_key(path))

    def _load(self, key: str) -> Dataset:
        return Dataset(key=key, uri=self.storage.uri(key), version=self.storage.version(key))
