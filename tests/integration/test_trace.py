"""bench/trace.py: the seeded trace is the same on every machine, a request log replays as
written, and the replay goes through the real service. (Here, not in tests/unit: the wheel
test runs without the repository's bench/ folder.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.trace import (
    Request,
    fixed_set_gb,
    main,
    read_log,
    replay,
    working_set_gb,
    zipf_trace,
)


def test_the_seeded_trace_is_pinned() -> None:
    trace = zipf_trace(12, 5, seed=42)
    assert [(r.image_id, r.size_gb) for r in trace] == [
        ("img-0000", 4), ("img-0000", 4), ("img-0002", 9), ("img-0001", 1), ("img-0001", 1),
        ("img-0000", 4), ("img-0000", 4), ("img-0000", 4), ("img-0001", 1), ("img-0001", 1),
        ("img-0002", 9), ("img-0002", 9)]
    assert zipf_trace(12, 5, seed=42) == trace
    assert zipf_trace(12, 5, seed=43) != trace


def test_popularity_follows_the_rank() -> None:
    trace = zipf_trace(5000, 50, alpha=0.9, seed=1)
    counts = {f"img-{k:04d}": 0 for k in range(50)}
    for request in trace:
        counts[request.image_id] += 1
    assert counts["img-0000"] > counts["img-0009"] > counts["img-0049"]


def test_a_log_is_read_line_by_line_and_a_bad_line_is_named() -> None:
    assert read_log(["a 2", "", "# a comment", "b 3  # trailing", "a 2"]) == [
        Request("a", 2), Request("b", 3), Request("a", 2)]
    with pytest.raises(ValueError, match="line 2: 'c x'"):
        read_log(["a 1", "c x"])
    with pytest.raises(ValueError, match="line 1"):
        read_log(["a 0"])


def test_a_replay_counts_hits_misses_and_the_gigabytes_downloaded() -> None:
    trace = [Request("a", 2), Request("a", 2), Request("b", 3), Request("a", 2),
             Request("c", 4), Request("b", 3)]
    assert working_set_gb(trace) == 9
    # Room for everything: every image is downloaded once.
    everything = replay(trace, cache_fraction=1.0)
    assert (everything.hits, everything.misses, everything.gb_downloaded) == (3, 3, 9)
    # 5 GiB: c (4) evicts a and b (least recently used) to fit; b is downloaded again.
    tight = replay(trace, cache_fraction=5 / 9)
    assert (tight.cache_gb, tight.hits, tight.gb_downloaded) == (5, 2, 12)
    assert replay(zipf_trace(200, 20, seed=42), cache_fraction=0.3).hits == 103


def test_gdsf_keeps_the_popular_image_that_lru_evicts() -> None:
    # 5 GiB of cache: c (3) needs room. lru evicts a (used longest ago, but three times) and
    # b; gdsf evicts b alone (one use, a download as costly per GiB as a's).
    trace = [Request("a", 2)] * 3 + [Request("b", 3), Request("c", 3), Request("a", 2)]
    lru = replay(trace, cache_fraction=5 / 8, policy="lru")
    gdsf = replay(trace, cache_fraction=5 / 8, policy="gdsf")
    assert (lru.cache_gb, lru.hits, lru.gb_downloaded) == (5, 2, 10)
    assert (gdsf.cache_gb, gdsf.hits, gdsf.gb_downloaded) == (5, 3, 8)
    small = zipf_trace(200, 20, seed=42)
    small_gdsf = replay(small, cache_fraction=0.3, policy="gdsf")
    assert (small_gdsf.hits, small_gdsf.gb_downloaded) == (116, 742)


def test_the_script_replays_a_log_under_both_policies_or_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "requests.txt"
    log.write_text("a 2\na 2\na 2\nb 3\nc 3\na 2\n", encoding="utf-8")
    assert main(["--log", str(log), "--cache-fraction", str(5 / 8)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["lru", "gdsf", "fixed"]
    assert "gb_downloaded 10 " in lines[0] and "gb_downloaded 8 " in lines[1]
    assert main(["--log", str(log), "--policy", "gdsf"]) == 0
    assert capsys.readouterr().out.startswith("gdsf ")
    log.write_text("a two\n", encoding="utf-8")
    assert main(["--log", str(log)]) == 1
    assert "line 1: 'a two'" in capsys.readouterr().err


def test_the_fixed_set_yardstick_keeps_the_most_requested_images_that_fit() -> None:
    # 5 GiB of cache: a (3 requests) then b (2; 3 GiB) fit; c (2 requests too, but 4 GiB)
    # does not, and d (1 request) is downloaded once either way.
    trace = [Request("a", 2)] * 3 + [Request("b", 3)] * 2 + [Request("c", 4)] * 2 + [
        Request("d", 1)]
    assert working_set_gb(trace) == 10
    assert fixed_set_gb(trace, cache_fraction=0.5) == 2 + 3 + 4 * 2 + 1
    # Room for all: each image once, the working set.
    assert fixed_set_gb(trace, cache_fraction=1.0) == 10
    # A yardstick, not a bound: each image's requests come in one burst here, and lru,
    # which follows recency, downloads each image once (10), better than any fixed set.
    assert replay(trace, cache_fraction=0.5, policy="lru").gb_downloaded == 10
