"""``ivcache demo``: the whole cache on the embedded default, in a couple of seconds."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from ivcache.core.model import CreateResult, Outcome
from ivcache.entrypoints.bootstrap import wire
from ivcache.entrypoints.config import default_home, load_config

__all__ = ["make_sparse_image", "run_demo"]

MIB = 1 << 20


def make_sparse_image(path: Path, *, virtual_mib: int = 1024, data_mib: int = 64,
                      seed: bytes = b"ivcache") -> Path:
    """A raw image of ``virtual_mib`` MiB holding ``data_mib`` MiB of data in 4 runs."""
    run = max(1, data_mib // 4) * MIB
    stride = virtual_mib * MIB // 4
    block = (seed * (MIB // len(seed) + 1))[:MIB]
    with open(path, "wb") as fh:
        for i in range(4):
            fh.seek(i * stride)
            written = 0
            while written < run:
                fh.write(bytes([i]) + block[1:])
                written += MIB
        fh.truncate(virtual_mib * MIB)
    return path


def _config_text(home: Path) -> str:
    return f"""[DEFAULT]
host = demo-host
image_volume_cache_enabled = true
image_volume_cache_max_count = 2
image_volume_cache_max_size_gb = 10

[ivcache]
database_url = sqlite:///{home / 'ivcache.db'}
storage = file
storage_path = {home / 'volumes'}
image_source = local
images_path = {home / 'images'}
notifier = none
"""


def run_demo(*, json_output: bool = False) -> None:
    env_home = os.environ.get("IVCACHE_HOME")
    if env_home:
        _walk(default_home() / "demo", json_output)
        return
    with tempfile.TemporaryDirectory(prefix="ivcache-demo-") as tmp:
        _walk(Path(tmp), json_output)


def _walk(home: Path, json_output: bool) -> None:
    say = (lambda text: None) if json_output else click.echo
    home.mkdir(parents=True, exist_ok=True)
    config_file = home / "ivcache-demo.ini"
    config_file.write_text(_config_text(home), encoding="utf-8")
    wiring = wire(load_config(config_file))
    service, source = wiring.service, wiring.local_images
    from ivcache.core.model import RequestContext
    ctx = RequestContext.for_project("demo")
    say(f"ivcache demo in {home}")
    say("  config: max 2 entries, 10 GiB; SQLite + file storage + local images")

    def add(name: str, seed: bytes) -> str:
        raw = home / f"{name}.raw"
        make_sparse_image(raw, virtual_mib=256, data_mib=32, seed=seed)
        image = source.add_image(ctx, raw, name=name)
        raw.unlink()
        say(f"  image {name}: {image.id} (256 MiB, 32 MiB of data)")
        return image.id

    def create(image_id: str, size: int) -> CreateResult:
        result = service.create_volume(ctx, image_id, size)
        say(f"  volume {result.volume.id} {size} GiB: {result.outcome.value:<13} "
            f"{result.seconds * 1000:8.1f} ms")
        return result

    first = add("cirros", b"cirros")
    say("three volumes from one image:")
    runs = [create(first, size) for size in (1, 2, 3)]
    say("the cache:")
    for entry in service.list_entries():
        say(f"  {entry.image_id}  {entry.size_gb} GiB  {entry.state.value}  hits={entry.hits}")
    say("two more images fill the cache past its limit of 2 entries:")
    for name in ("debian", "fedora"):
        create(add(name, name.encode()), 1)
    evicted = first not in {e.image_id for e in service.list_entries()}
    say(f"  the least recently used entry ({first}) was "
        f"{'evicted' if evicted else 'kept'}")
    totals = service.stats()
    miss = runs[0].seconds
    hits = [r.seconds for r in runs[1:] if r.outcome is Outcome.HIT]
    summary = {
        "home": str(home),
        "outcomes": [r.outcome.value for r in runs],
        "miss_seconds": round(miss, 4),
        "hit_seconds": [round(h, 4) for h in hits],
        "evicted_first_image": evicted,
        "stats": {"hits": totals.hits, "misses": totals.misses,
                  "evictions": totals.evictions, "entries": totals.count,
                  "downloads": totals.downloads},
    }
    if json_output:
        click.echo(json.dumps(summary, indent=2))
        return
    best = min(hits) if hits else miss
    say("summary:")
    say(f"  miss {miss * 1000:.1f} ms, hits "
        f"{', '.join(f'{h * 1000:.1f} ms' for h in hits)} "
        f"({miss / best if best else float('inf'):.0f}x faster)")
    say(f"  hits={totals.hits} misses={totals.misses} evictions={totals.evictions} "
        f"entries={totals.count} downloads={totals.downloads}")
