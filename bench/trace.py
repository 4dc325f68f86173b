"""Replay a trace of volume-create requests through the real cache service, on fakes.

A trace is a list of requests, each an image id and the image's size in GiB. Either make a
seeded one whose popularity follows Zipf's law (most requests go to a few images), or replay
your own request log::

    python bench/trace.py                                  # 2,000 requests, 200 images
    python bench/trace.py --requests 500 --alpha 1.1 --seed 7
    python bench/trace.py --log requests.txt --cache-fraction 0.2

A log has one request a line, ``IMAGE_ID SIZE_GB`` (blank lines and ``#`` comments are
skipped). The cache is bounded to ``--cache-fraction`` of the trace's working set (the sum
of its distinct images' sizes); storage and images are in-memory fakes, so what is measured
is the policy's choice: hits, misses, and the GiB the misses downloaded. ``--policy`` is the
eviction policy (``lru``, Cinder's, or ``gdsf``; ``both`` compares them). Time is a fake
clock: one second between requests, and a download takes ``--seconds-per-gib`` per GiB of
the image (the cost ``gdsf`` measures as the entry's fill time), so a replay is fast and
gives the same figures on every machine.

With ``--policy both`` a third line, ``fixed``, is a yardstick rather than a policy: the GiB
downloaded had the cache held, from the start, the best fixed set of images for this trace
(the most requested ones that fit, chosen with hindsight), each downloaded once. On a trace
whose popularity does not change (the seeded Zipf one), no policy that learns popularity as
it goes can be expected to do much better than that, so it shows how much of the gap to
``lru`` a policy closes. It is not a bound: where requests come in bursts (an image asked
many times in a row, then no more), recency beats any fixed set.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import itertools
import math
import random
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from ivcache.adapters.memory import (
    FakeClock,
    InMemoryImageSource,
    InMemoryUnitOfWork,
    RecordingNotifier,
)
from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.core.model import GIB, Image, Outcome, RequestContext
from ivcache.core.policy import EVICTION_POLICIES, CachePolicy
from ivcache.core.service import CacheService

__all__ = ["Replay", "Request", "fixed_set_gb", "read_log", "replay", "zipf_trace"]

CTX = RequestContext.for_project("trace")


@attrs.frozen
class Request:
    image_id: str
    size_gb: int


@attrs.frozen
class Replay:
    requests: int
    hits: int
    misses: int
    gb_downloaded: int
    cache_gb: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


def zipf_trace(requests: int = 2000, images: int = 200, *, alpha: float = 0.9,
               min_gb: int = 1, max_gb: int = 20, seed: int = 1) -> list[Request]:
    """``requests`` requests over ``images`` images of sizes ``min_gb``–``max_gb`` (uniform),
    image k (from 1) asked with a weight of 1/k**alpha. The same seed gives the same trace;
    popularity and size are drawn independently, so a popular image may be large."""
    rng = random.Random(seed)
    sizes = [rng.randint(min_gb, max_gb) for _ in range(images)]
    weights = list(itertools.accumulate(1 / (k ** alpha) for k in range(1, images + 1)))
    total = weights[-1]
    trace = []
    for _ in range(requests):
        k = bisect.bisect_left(weights, rng.random() * total)
        trace.append(Request(f"img-{k:04d}", sizes[k]))
    return trace


def read_log(lines: Iterable[str]) -> list[Request]:
    """Requests from a log: ``IMAGE_ID SIZE_GB`` a line; ValueError names a bad line."""
    trace = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) < 1:
            raise ValueError(f"line {number}: {line.strip()!r} is not 'IMAGE_ID SIZE_GB'")
        trace.append(Request(parts[0], int(parts[1])))
    return trace


def image_sizes(trace: Sequence[Request]) -> dict[str, int]:
    """Each distinct image of the trace and its size in GiB."""
    return {r.image_id: r.size_gb for r in trace}


def working_set_gb(trace: Sequence[Request]) -> int:
    return sum(image_sizes(trace).values())


def cache_gb(trace: Sequence[Request], cache_fraction: float) -> int:
    """The cache's bound: ``cache_fraction`` of the working set, at least 1 GiB."""
    return max(1, math.floor(working_set_gb(trace) * cache_fraction))


#: A download's fake duration per GiB (about 128 MiB/s). With a cost proportional to size,
#: the figures do not depend on it; a log whose sizes are not the download times would.
SECONDS_PER_GIB = 8.0


def replay(trace: Sequence[Request], *, cache_fraction: float = 0.15, policy: str = "lru",
           seconds_per_gib: float = SECONDS_PER_GIB) -> Replay:
    """Every request through ``CacheService.create_volume`` with the cache bounded to
    ``cache_fraction`` of the working set, evicting by ``policy``; one second of fake time
    between requests, and ``seconds_per_gib`` of it per GiB downloaded."""
    bound = cache_gb(trace, cache_fraction)
    clock = FakeClock(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    images = InMemoryImageSource(clock=clock, seconds_per_gib=seconds_per_gib)
    for image_id, size in image_sizes(trace).items():
        images.add(Image(id=image_id, name=image_id, virtual_size=size * GIB,
                         updated_at=clock.now()), image_id.encode())
    service = CacheService(
        host="trace", storage=FakeLvmStorage(10**9, host="trace"), images=images,
        uow=InMemoryUnitOfWork(), notifier=RecordingNotifier(), clock=clock,
        policy=CachePolicy(max_size_gb=bound, eviction_policy=policy))
    hits = gb = 0
    for request in trace:
        result = service.create_volume(CTX, request.image_id, request.size_gb)
        if result.outcome is Outcome.HIT:
            hits += 1
        else:
            gb += request.size_gb
        # The user's volume is not what is measured: drop it so storage stays small.
        service.storage.delete_volume(result.volume.id)
        clock.advance(1)
    return Replay(len(trace), hits, len(trace) - hits, gb, bound)


def fixed_set_gb(trace: Sequence[Request], *, cache_fraction: float = 0.15) -> int:
    """The GiB downloaded with a cache that holds a fixed set of images: the most requested
    (with hindsight), largest first on ties, added while they fit in ``cache_fraction`` of
    the working set. A kept image costs one download, any other image one per request.

    Keeping image i saves ``(requests_i - 1) * size_i`` GiB for ``size_i`` GiB of cache, so
    the request count is the worth per GiB, and taking images by it is the greedy answer to
    that knapsack."""
    sizes = image_sizes(trace)
    counts: dict[str, int] = {}
    for request in trace:
        counts[request.image_id] = counts.get(request.image_id, 0) + 1
    kept: set[str] = set()
    room = cache_gb(trace, cache_fraction)
    for image_id in sorted(sizes, key=lambda i: (-counts[i], -sizes[i], i)):
        if sizes[image_id] <= room:
            kept.add(image_id)
            room -= sizes[image_id]
    return sum(sizes[i] if i in kept else sizes[i] * counts[i] for i in sizes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, help="replay this request log instead")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache-fraction", type=float, default=0.15)
    parser.add_argument("--policy", choices=(*EVICTION_POLICIES, "both"), default="both")
    parser.add_argument("--seconds-per-gib", type=float, default=SECONDS_PER_GIB)
    args = parser.parse_args(argv)
    if args.log is not None:
        try:
            trace = read_log(args.log.read_text(encoding="utf-8").splitlines())
        except (OSError, ValueError) as exc:
            print(f"trace: {args.log}: {exc}", file=sys.stderr)
            return 1
    else:
        trace = zipf_trace(args.requests, args.images, alpha=args.alpha, seed=args.seed)
    policies = EVICTION_POLICIES if args.policy == "both" else (args.policy,)
    for policy in policies:
        result = replay(trace, cache_fraction=args.cache_fraction, policy=policy,
                        seconds_per_gib=args.seconds_per_gib)
        print(f"{policy:<5} requests {result.requests}  hits {result.hits}  misses "
              f"{result.misses}  hit_ratio {result.hit_ratio:.3f}  gb_downloaded "
              f"{result.gb_downloaded}  cache_gb {result.cache_gb} (of "
              f"{working_set_gb(trace)} GiB working set)")
    if args.policy == "both":
        print(f"fixed gb_downloaded {fixed_set_gb(trace, cache_fraction=args.cache_fraction)}"
              "  (the best fixed set of images, chosen with hindsight: a yardstick)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
