"""Secrets kept out of logs and metadata: passwords in URIs and messages, secret-looking keys."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key|private)", re.I)
"""Keys whose values are masked."""
REDACTED = "***"
_URI_PASSWORD = re.compile(r"(\w[\w+.-]*://[^\s/:@]+:)[^\s/@]+@")


def redact_uri(uri: str) -> str:
    """``uri`` with any password in its network location replaced by ``***``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", f":{REDACTED}@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def redact_text(text: str) -> str:
    """``text`` (an error message) with the password of every URI in it replaced by ``***``."""
    return _URI_PASSWORD.sub(rf"\g<1>{REDACTED}@", text)


def redact(data: Any) -> Any:
    """Plain data with secret-looking keys masked and passwords removed from URIs."""
    if isinstance(data, Mapping):
        return {k: REDACTED if SECRET_KEY.search(str(k)) else redact(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact(v) for v in data]
    if isinstance(data, str) and "://" in data:
        return redact_uri(data)
    return data
