"""The words of the domain: images, volumes, cache entries, who is asking."""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import math
import re
import uuid
from collections.abc import Iterable, Sequence

import attrs

from ivcache.core.errors import InvalidIdentifier, InvalidRequest

__all__ = [
    "DEFAULT_BACKEND",
    "GIB",
    "MAX_VOLUME_GB",
    "BadImage",
    "CacheEntry",
    "CreateResult",
    "EntryState",
    "Image",
    "InternalTenant",
    "Lease",
    "NewImage",
    "Outcome",
    "Owner",
    "RequestContext",
    "Scope",
    "ScopeTotals",
    "Volume",
    "VolumeWrite",
    "check_id",
    "new_id",
]

GIB = 1024**3
#: The largest volume any backend could address: 64-bit byte offsets.
MAX_VOLUME_GB = (2**63 - 1) // GIB

#: The backend of a configuration without ``enabled_backends``; its pool is named the same
#: unless the storage says otherwise (``rbd_pool``, ``pool_name``).
DEFAULT_BACKEND = "default"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is safe as a file name or pool object name, else raise.

    Ids end up in paths and RBD image names, so ``/``, ``..`` and NUL must never pass.
    """
    if not isinstance(value, str) or not _ID.fullmatch(value) or ".." in value:
        raise InvalidIdentifier(kind, str(value))
    return value


def new_id() -> str:
    return str(uuid.uuid4())


def _scope_part(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value or "@" in value or "#" in value \
            or value != value.strip():
        raise InvalidRequest(
            f"{kind} name {value!r} cannot be part of a scope CLUSTER_OR_HOST@BACKEND#POOL: "
            "it must be non-empty, without '@', '#' or surrounding spaces")
    return value


@attrs.frozen
class Scope:
    """Where cache entries are shared, in Cinder's form ``CLUSTER_OR_HOST@BACKEND#POOL``.

    Hosts that name the same ``cluster`` and backend share one entry per image and pool;
    without a cluster the host's own name keys the scope. Limits, LRU order, single flight,
    stats and reconcile are per scope. Every part is checked: ``@`` and ``#`` are the key's
    separators, so no part may hold them (``InvalidRequest``).
    """

    host: str
    backend: str = DEFAULT_BACKEND
    pool: str = DEFAULT_BACKEND
    cluster: str | None = None

    def __attrs_post_init__(self) -> None:
        _scope_part("host", self.host)
        _scope_part("backend", self.backend)
        _scope_part("pool", self.pool)
        if self.cluster is not None:
            _scope_part("cluster", self.cluster)

    @property
    def key(self) -> str:
        """``CLUSTER_OR_HOST@BACKEND#POOL``: what entries and totals are keyed by."""
        return f"{self.cluster or self.host}@{self.backend}#{self.pool}"

    @property
    def host_key(self) -> str:
        """The key the host's entries of this backend and pool had without a cluster."""
        return f"{self.host}@{self.backend}#{self.pool}"

    def __str__(self) -> str:
        return self.key


@attrs.frozen
class Image:
    """What the image source says of an image."""

    id: str
    name: str = ""
    size: int = 0
    virtual_size: int | None = None
    min_disk: int = 0
    updated_at: dt.datetime | None = None
    owner: str | None = None
    visibility: str = "public"
    status: str = "active"
    os_hash_algo: str | None = None
    os_hash_value: str | None = None
    checksum: str | None = None
    disk_format: str = "raw"
    container_format: str = "bare"

    @property
    def min_size_gb(self) -> int:
        """The smallest volume, in GiB, that can hold this image (at least 1)."""
        data = self.virtual_size if self.virtual_size else self.size
        return max(1, math.ceil(data / GIB), self.min_disk)

    @property
    def content_hash(self) -> str | None:
        """``algo:value`` of the best hash known, or None: what staleness compares."""
        if self.os_hash_algo and self.os_hash_value:
            return f"{self.os_hash_algo}:{self.os_hash_value}"
        if self.checksum:
            return f"md5:{self.checksum}"
        return None

    @property
    def expected_hash(self) -> tuple[str, str] | None:
        """``(algorithm, hex digest)`` the data is checked against while it streams: the
        ``os_hash_*`` pair when this Python can compute that algorithm, else the md5
        ``checksum``, else None (nothing to check)."""
        if (self.os_hash_algo and self.os_hash_value
                and self.os_hash_algo in hashlib.algorithms_available):
            return self.os_hash_algo, self.os_hash_value
        if self.checksum:
            return "md5", self.checksum
        return None


@attrs.frozen
class NewImage:
    """An image to be made from a volume's bytes: its name, its disk format (the bytes'
    format: ``raw`` or ``qcow2``) and its visibility (None: the image source's default)."""

    name: str
    disk_format: str = "raw"
    container_format: str = "bare"
    visibility: str | None = None


@attrs.frozen
class Volume:
    """A volume on a storage backend.

    ``location`` is where it lives for the backend's users: a path for file and qcow2
    backends, an image name for RBD; ``location_kind`` says which (``path``, ``rbd_image``).
    """

    id: str
    size_gb: int
    owner: str
    host: str = ""
    location: str = ""
    location_kind: str = "path"


@attrs.frozen
class RequestContext:
    """Who is calling.

    ``auth_token`` is the caller's own Keystone token, where there is one: an image source
    that speaks to a Keystone-protected service asks it with this token, so that the
    service, not ivcache, decides what the caller may see. It is left out of ``repr`` so
    that it never reaches a log line.
    """

    project_id: str
    user_id: str
    roles: tuple[str, ...] = ("member", "reader")
    is_admin: bool = False
    auth_token: str | None = attrs.field(default=None, repr=False, kw_only=True)

    @classmethod
    def for_project(cls, project_id: str, *, user_id: str | None = None,
                    admin: bool = False) -> RequestContext:
        roles = ("member", "reader", "admin") if admin else ("member", "reader")
        return cls(project_id, user_id or f"{project_id}-user", roles, admin)


@attrs.frozen
class InternalTenant:
    """The project and user that own every cache volume, and their quota (0 = unlimited)."""

    project_id: str = "internal"
    user_id: str = "internal"
    quota_gb: int = 0
    quota_volumes: int = 0

    def context(self) -> RequestContext:
        """The cache's own identity, used to ask whether an image is gone for everyone."""
        return RequestContext(self.project_id, self.user_id, ("admin", "member", "reader"),
                              is_admin=True)

    def check_caller(self, ctx: RequestContext, *, admin_ok: bool = False) -> None:
        """Refuse a user request made as the internal tenant's project (an admin's too,
        unless ``admin_ok``): what it made would look like the cache's own, and reconcile
        would take it for an orphan."""
        if ctx.project_id == self.project_id and not (admin_ok and ctx.is_admin):
            raise InvalidRequest(
                f"project {ctx.project_id} is the cache's internal tenant "
                "(cinder_internal_tenant_project_id): act as another project")

    def quota_allows(self, totals: Iterable[ScopeTotals], adding_gb: int,
                     freed: Sequence[CacheEntry] = ()) -> bool:
        """Whether one more cache volume of ``adding_gb`` fits the quota, with the ``freed``
        entries gone, given every scope's totals (the quota spans all of them)."""
        if not self.quota_gb and not self.quota_volumes:
            return True
        gb = volumes = 0
        for t in totals:
            gb, volumes = gb + t.size_gb, volumes + t.count
        gb += adding_gb - sum(e.size_gb for e in freed)
        volumes += 1 - len(freed)
        return not ((self.quota_gb and gb > self.quota_gb)
                    or (self.quota_volumes and volumes > self.quota_volumes))


@attrs.frozen
class Owner:
    """A process that holds a claim, a lease or a write: the machine (``node``), its pid and
    its start time (clock ticks after boot), so that a pid used again by a new process is
    not taken for the old one. Written ``NODE:PID.START`` (``START`` 0: not known)."""

    node: str
    pid: int
    started: int = 0

    def __str__(self) -> str:
        return f"{self.node}:{self.pid}.{self.started}"

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        """The owner ``str`` wrote, or None for text that is not one (rows of older
        versions, which named no owner)."""
        node, sep, rest = text.rpartition(":")
        pid, _, started = rest.partition(".")
        if not sep or not node or not pid.isdigit() or not (started or "0").isdigit():
            return None
        return cls(node, int(pid), int(started or 0))


@attrs.frozen
class Lease:
    """A clone reading an entry's volume: eviction keeps off the entry while a lease is
    held. ``owner`` (an ``Owner``'s text) keeps it alive by its heartbeat: ``until`` is
    moved on at each beat; a lease past ``until``, or whose owner is provably dead, no
    longer holds."""

    id: str
    entry_id: str
    owner: str
    until: dt.datetime

    def holds(self, now: dt.datetime) -> bool:
        return self.until > now


@attrs.frozen
class VolumeWrite:
    """A user's volume being written by ``owner`` (an uncached create: the volume exists
    before its bytes do). Kept alive by the owner's heartbeat, as a lease."""

    volume_id: str
    owner: str
    until: dt.datetime


@attrs.frozen
class BadImage:
    """A finding that an image's data failed verification (the negative cache): ``kind``
    names the error (``ChecksumMismatch``...), ``reason`` is its message, ``content`` the
    image content it is about (its hash, else its ``updated_at``), ``until`` when it is
    forgotten."""

    content: str
    kind: str
    reason: str
    until: dt.datetime


class EntryState(enum.Enum):
    CREATING = "creating"
    READY = "ready"


class Outcome(enum.Enum):
    HIT = "hit"
    MISS = "miss"
    MISS_UNCACHED = "miss-uncached"
    DISABLED = "disabled"


@attrs.define
class CacheEntry:
    """One cached image in one scope: a minimal-size volume owned by the internal tenant.

    ``host`` made it; ``cluster``, ``backend`` and ``pool`` with it say its scope (see
    ``Scope``): a cluster's entry serves every host of the cluster.
    A CREATING entry is a claim: it reserves its size and count while its owner
    (``claim_owner``, an ``Owner``'s text) downloads; the owner's heartbeat moves
    ``claim_expires`` on, and a claim past it, or whose owner is provably dead, is taken
    over by the next request. ``lease_until`` is when the last of the entry's leases (see
    ``Lease``: clones reading its volume) runs out, as the repository read it; eviction
    keeps off a leased entry.
    The savings ledger: ``fill_seconds`` is how long filling its volume took (measured; None
    until READY, and for entries older than the ledger); each hit adds the image's bytes to
    ``bytes_saved`` and ``fill_seconds`` minus its own clone's time to ``seconds_saved``.
    ``priority`` is its GreedyDual-Size-Frequency value (see ``CachePolicy.priority``, which
    weighs ``fill_seconds``), the order the ``gdsf`` eviction policy takes victims in.
    """

    id: str
    host: str
    image_id: str
    volume_id: str
    size_gb: int
    image_updated_at: dt.datetime | None
    image_hash: str | None
    state: EntryState
    created_at: dt.datetime
    last_used: dt.datetime
    hits: int = 0
    pinned: bool = False
    claim_expires: dt.datetime | None = None
    lease_until: dt.datetime | None = None
    claim_owner: str | None = None
    cluster: str | None = None
    backend: str = DEFAULT_BACKEND
    pool: str = DEFAULT_BACKEND
    fill_seconds: float | None = None
    bytes_saved: int = 0
    seconds_saved: float = 0.0
    priority: float = 0.0

    @property
    def scope(self) -> Scope:
        return Scope(self.host, self.backend, self.pool, self.cluster)

    @property
    def scope_key(self) -> str:
        """``CLUSTER_OR_HOST@BACKEND#POOL`` (without building a checked ``Scope``)."""
        return f"{self.cluster or self.host}@{self.backend}#{self.pool}"

    @property
    def ready(self) -> bool:
        return self.state is EntryState.READY

    def leased(self, now: dt.datetime) -> bool:
        return self.lease_until is not None and self.lease_until > now

    def claim_expired(self, now: dt.datetime) -> bool:
        return (self.state is EntryState.CREATING and self.claim_expires is not None
                and self.claim_expires <= now)

    def is_stale_for(self, image: Image) -> bool:
        """Whether the cached bytes may differ from the image's.

        A known hash decides; with no hash on either side, a changed ``updated_at``
        means stale (Cinder's rule).
        """
        current = image.content_hash
        if current is not None and self.image_hash is not None:
            return current != self.image_hash
        return self.image_updated_at != image.updated_at


@attrs.frozen
class ScopeTotals:
    """Per-scope bookkeeping, kept in one row updated with the entries.

    ``downloads`` counts the images fetched from the image source; ``neighbour_fills`` the
    cache volumes filled instead from another scope's entry on storage the backend can copy.
    ``bytes_saved`` and ``seconds_saved`` are the savings ledger, the sum over the scope's
    hits of what each entry's ``CacheEntry`` ledger adds (kept when entries are evicted).
    ``gdsf_age`` is GreedyDual's aging value L: the priority of the last entry the ``gdsf``
    policy evicted, from which every entry's new priority starts.
    """

    scope: str
    count: int = 0
    size_gb: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    downloads: int = 0
    bytes_downloaded: int = 0
    neighbour_fills: int = 0
    bytes_saved: int = 0
    seconds_saved: float = 0.0
    gdsf_age: float = 0.0

    @property
    def hit_ratio(self) -> float:
        """Hits over the requests that went through the cache (hits and misses); 0 with
        none (a disabled cache's requests count in neither)."""
        served = self.hits + self.misses
        return self.hits / served if served else 0.0


@attrs.frozen
class CreateResult:
    """A created volume and how: ``filled_from`` says, for a miss, where the new cache
    volume's bytes came from (``image-source`` or a neighbour's scope); None otherwise."""

    volume: Volume
    outcome: Outcome
    entry_id: str | None = None
    seconds: float = 0.0
    filled_from: str | None = None
    #: how long the clone of the cache volume took (hit or miss); None when none was made
    clone_seconds: float | None = None
