"""A short reason for a failed HTTP attempt, shared by the adapters that speak HTTP
(Glance, Keystone): requests and keystoneauth bury the useful part in long messages."""

from __future__ import annotations

__all__ = ["describe"]


def describe(exc: BaseException) -> str:
    """A short reason for a failed attempt.

    requests and keystoneauth bury the useful part ("connection refused") in a long message
    or in the exception's cause (a failed version discovery hides the refused connection).
    """
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(texts) < 8:
        texts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    joined = " ".join(texts)
    for marker, said in _REASONS:
        if marker in joined:
            return said
    first = (texts[0].strip() or type(exc).__name__).splitlines()[0]
    return first if len(first) <= 160 else first[:157] + "..."


_REASONS = (
    ("Connection refused", "connection refused"),
    ("timed out", "timed out"),
    ("Name or service not known", "host name not known"),
    ("Temporary failure in name resolution", "host name not known"),
    ("Connection reset", "connection reset"),
    ("Connection aborted", "connection aborted"),
    ("IncompleteRead", "connection closed before the end of the data"),
    ("Response ended prematurely", "connection closed before the end of the data"),
    ("certificate verify failed", "TLS certificate verification failed"),
)
