"""MultiNotifier: every notifier gets every event."""

from __future__ import annotations

import pytest

from ivcache.adapters.memory import RecordingNotifier
from ivcache.adapters.notify import MultiNotifier
from ivcache.core.events import CacheHit, Event
from ivcache.core.ports import Notifier


class Broken:
    def publish(self, event: Event) -> None:
        raise RuntimeError("notifier down")


def test_each_event_reaches_every_notifier_in_order() -> None:
    first, second = RecordingNotifier(), RecordingNotifier()
    fanout: Notifier = MultiNotifier(first, second)
    hit = CacheHit("img-1", "node-1")

    fanout.publish(hit)

    assert first.events == second.events == [hit]


def test_a_failing_notifier_does_not_starve_the_others_and_its_error_is_raised() -> None:
    after = RecordingNotifier()
    fanout = MultiNotifier(Broken(), after)

    with pytest.raises(RuntimeError, match="notifier down"):
        fanout.publish(CacheHit("img-1", "node-1"))

    assert len(after.events) == 1


def test_no_notifiers_is_a_valid_do_nothing_notifier() -> None:
    MultiNotifier().publish(CacheHit("img-1", "node-1"))
