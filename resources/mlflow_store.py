"""Reaching an MLflow tracking store: its health, what counts as unreachable, the error naming it
(password masked), and MLflow's fluent API pointed at it without touching the environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow

from resources.redaction import redact_text, redact_uri


class MlflowUnavailableError(RuntimeError):
    """The tracking store cannot be reached or used; raised before any training starts."""


def unreachable(error: BaseException) -> bool:
    """Whether ``error``, or an error it wraps, says the tracking server could not be reached,
    timed out, or kept answering 5xx/429 through the client's retries."""
    import requests

    gone = (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)
    seen: set[int] = set()
    cur: BaseException | None = error
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, gone):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def unavailable_error(uri: str, error: BaseException, what: str, hint: str = "") -> MlflowUnavailableError:
    """The error for a store that ``what``, naming it and the cause with passwords masked (raise it
    ``from None``: the cause's own text shows the URI as given)."""
    cause = redact_text(f"{type(error).__name__}: {error}")[:2000]
    return MlflowUnavailableError(f"MLflow tracking store {redact_uri(uri)} {what} ({cause}).{hint}")


def health(uri: str, timeout: float) -> Any:
    """A tracking server's answer to ``GET /health`` (raises ``requests``' errors)."""
    import requests

    return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)


@contextmanager
def restored_environ(*keys: str) -> Iterator[None]:
    """Puts the environment variables ``keys`` back as they were when the block ends."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def set_fluent_uris(tracking_uri: str, registry_uri: str) -> None:
    """Point MLflow's fluent API at the store without leaking it into ``os.environ``.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, which every later resource in
    the process would then take for the user's choice (e.g. a stopped server's address).
    """
    with restored_environ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mlflow.set_tracking_uri(tracking_uri)
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
