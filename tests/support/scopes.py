"""Scope keys for tests that speak of hosts on the default backend."""

from __future__ import annotations

from ivcache.core.model import Scope

__all__ = ["scope_of"]


def scope_of(host: str) -> str:
    """The key of ``host``'s scope on the default backend and pool (no cluster): where
    ``CacheService(host=host, ...)`` keeps its entries and totals."""
    return Scope(host).key
