"""Secrets out of text meant for people: logs, messages, banners.

``redact`` masks what a string visibly carries (passwords in URLs and DSN
keywords, bearer tokens, Conveyor API keys); ``redact_url`` prints a database
or bus URL without its password.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# user:password@ in any URL-like text (postgresql://, redis://, https://, ...).
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*:)[^\s/]*(?=@)")
# password=..., sslpassword=..., token=..., secret=... in query strings and DSN keywords.
_KEYWORD_SECRET = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd|sslpassword|token|secret|api_key|apikey|access_token)"
    r"['\"]?\s*[=:]\s*)(?P<quote>['\"]?)(?P<value>[^\s&'\",;)}]+)",
    re.IGNORECASE,
)
# A lock's or a lease's fencing token (``token=42``) is a counter, not a secret:
# readable in logs so that operators can tell holders apart. A bare ``token=``
# with up to 19 digits (an int64) is one; secrets are never that short and plain.
_FENCING_VALUE = re.compile(r"[0-9]{1,19}")
_BEARER = re.compile(r"(?P<head>\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
# Conveyor API keys: cvk_<id>_<secret> (see conveyor.security.api_keys).
_API_KEY = re.compile(r"\bcvk_[0-9a-f]+_[A-Za-z0-9_-]+")


def redact(text: str) -> str:
    """``text`` with every secret it visibly carries replaced by ``***``."""
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    text = _KEYWORD_SECRET.sub(_mask_keyword, text)
    text = _BEARER.sub(lambda m: m["head"] + MASK, text)
    return _API_KEY.sub("cvk_" + MASK, text)


def _mask_keyword(m: re.Match[str]) -> str:
    if _FENCING_VALUE.fullmatch(m["value"]) and m["head"].lower().startswith("token"):
        return m[0]
    return m["head"] + m["quote"] + MASK


def redact_url(url: str) -> str:
    """A database or bus URL fit to print: its password (in the user part or the
    query) replaced by ``***``. Shapes: ``postgresql://user:***@host:5432/db``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    if parts.password is None:
        return redact(url)  # urlunsplit would turn sqlite:/// into sqlite:/
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return redact(urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}")))
