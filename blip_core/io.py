"""Small filesystem helpers shared by every stage: atomic writes, content hashes, safe paths.

Every output of the pipeline is written so that a reader never sees a half-written file or
folder: files go through a temporary sibling plus ``os.replace``; whole folders are built in a
temporary sibling (``.{name}.tmp-xxxx``) and renamed into place by :func:`atomic_dir`. Both
fsync what they rename before renaming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20  # bytes read at a time when hashing


def fsync_path(path: Path, strict: bool = False) -> None:
    """Flushes a file, or a directory's entries, to disk.

    Best effort unless ``strict`` (not every OS / filesystem lets a directory be fsynced).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` to ``path`` so that readers see either the old file or the new one.

    Args:
        path: Destination file; its parent folder is created if missing.
        data: Bytes to write.

    Returns:
        The destination path.
    """
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes UTF-8 ``text`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Writes ``obj`` as JSON (UTF-8, trailing newline) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[Any]:
    """Opens a temporary sibling of ``path`` for streaming writes; renames it on success.

    Use it for files too large to build in memory (tar shards). On an exception the temporary
    file is removed and ``path`` is left untouched. ``mode``: ``"wb"`` or ``"w"`` (text).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes a new file: mode 'wb' or 'w', not {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling of ``path`` (``.{name}.tmp-xxxx``) for writers that want a file name
    (safetensors); fsynced and renamed onto ``path`` on success, removed on an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_path(tmp, strict=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_dir(final_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Builds a folder in a temporary sibling and moves it onto ``final_dir`` on success.

    An existing ``final_dir`` is replaced only once the new one is complete: it is renamed
    aside, the new folder renamed into place, then the old one deleted. On an exception the
    temporary folder is removed and ``final_dir`` is left as it was.

    Args:
        final_dir: The folder that should appear at once.

    Yields:
        The temporary folder to write into (``.{name}.tmp-xxxx`` beside ``final_dir``).
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _set_aside(final, "old") if final.exists() else None
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:  # put the previous version back
            os.replace(old / final.name, final)
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def delete_dir(folder: Path) -> None:
    """Renames ``folder`` to a dot-name (``.{name}.del-xxxx``), then deletes it: a kill half way
    leaves nothing visible under the old name."""
    shutil.rmtree(_set_aside(folder, "del"), ignore_errors=True)


def _set_aside(folder: Path, tag: str) -> Path:
    """Moves ``folder`` into a new hidden sibling ``.{name}.{tag}-xxxx``; returns that sibling."""
    holder = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{tag}-", dir=folder.parent))
    os.replace(folder, holder / folder.name)
    return holder


def _fsync_tree(root: Path) -> None:
    """Flushes every regular file and folder under ``root`` to disk (before it is renamed into
    place). Links, fifos and devices are not opened: opening a fifo would block."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if stat.S_ISREG(path.lstat().st_mode):
                fsync_path(path, strict=True)
        fsync_path(Path(dirpath))


def remove_leftovers_of(final: Path) -> list[str]:
    """Removes what killed writers of ``final`` left beside it: ``atomic_dir``'s hidden temporary
    (``.NAME.tmp-*``) and replaced (``.NAME.old-*``) folders, never read by anyone. Called once
    ``final`` is complete, so a writer racing for the same dataset fails loudly at worst."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-[^/]+")
    removed = []
    for entry in final.parent.glob(f".{final.name}.*"):
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def tree_hash(root: str | os.PathLike[str]) -> str:
    """Content hash of a folder, usable as a data version.

    Hashes the sorted relative POSIX paths of all regular files together with their SHA-256,
    so renaming, adding, removing or editing any file changes it. Entries whose name starts
    with a dot (temporary files and folders of the atomic writers, ``.gitignore``-like files)
    are ignored at any depth. Timestamps and permissions are not part of it.

    Args:
        root: Folder to hash.

    Returns:
        Hex SHA-256.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(root)
    entries: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root)
            if _is_hidden(rel) or not p.is_file():
                continue
            entries.append((rel.as_posix(), sha256_file(p)))
    h = hashlib.sha256()
    for rel_path, digest in sorted(entries):
        # surrogateescape: a file name that is not valid UTF-8 still hashes (to its own bytes)
        h.update(f"{rel_path}\0{digest}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def safe_member_path(root: str | os.PathLike[str], name: str) -> Path:
    """Joins an untrusted relative ``name`` (tar member, annotation path) onto ``root``.

    Args:
        root: Folder the result must stay inside.
        name: Untrusted relative path using ``/`` separators.

    Returns:
        ``root / name``.

    Raises:
        ValueError: If ``name`` is empty, absolute, not valid Unicode (a lone surrogate), contains
            a NUL, a backslash or a ``..`` component, or resolves (through symlinks) outside
            ``root``.
    """
    if not name or "\0" in name or "\\" in name:
        raise ValueError(f"unsafe path {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"path {name!r} holds a lone surrogate") from None
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"absolute path {name!r}")
    parts = name.split("/")
    if ".." in parts:
        raise ValueError(f"path {name!r} climbs out with '..'")
    root_resolved = Path(root).resolve()
    candidate = Path(root) / name
    if not candidate.resolve().is_relative_to(root_resolved):
        raise ValueError(f"path {name!r} resolves outside {root}")
    return candidate
