"""Cinder's cache notifications on the OpenStack bus, through oslo.messaging's ``Notifier``.

What a consumer of Cinder's notifications (Ceilometer's ``image_volume_cache.*`` event
definitions, any oslo.messaging notification listener) sees, as Cinder sends it:

- priority INFO, ``publisher_id`` ``volume.<host>``;
- ``event_type`` ``image_volume_cache.hit``, ``.miss`` or ``.evict`` (other events of the
  core, downloads and entry creations, are not Cinder's and stay off the bus);
- payload ``image_id`` and ``host`` as Cinder's, plus ivcache's ``entry_id``, ``outcome``
  (``miss`` or ``miss-uncached``) on a miss, ``reason`` and ``size_gb`` on an evict.

Never blocking: ``publish`` only queues the event; one sender thread per notifier delivers
the queue in order, so a request never waits for the broker. The retry is decided here, not
left to oslo.messaging's default: its ``Notifier`` retries on a connection it has (``retry =
-1``: until the broker is back), but logs and drops an event when it cannot make a new
connection, and raises nothing. The sender notices that (the driver's error record, from
its own thread) and sends the same event again with a backoff of up to ``MAX_BACKOFF``
seconds, before anything behind it: a broker outage delays events and never reorders or
drops them while the process lives. With several topics, a resend may repeat the event on
a topic that had it (at least once). ``close`` (called at exit) waits at most
``drain_seconds`` for the queue to empty, then logs how many events were left undelivered:
those are lost with the process.

Bad configuration fails at construction (``connect``), naming the option: a malformed
``transport_url``, an unknown driver, a broker that refuses the credentials. A broker that
is merely unreachable then is not an error: the events wait for it.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import warnings
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from ivcache.core.errors import ConfigError
from ivcache.core.events import CacheEvict, CacheHit, CacheMiss, Event

# oslo.messaging imports eventlet-era modules that warn about their own deprecation on import:
# nothing of ivcache's, and a CLI user would see it on every command.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import oslo_messaging  # type: ignore[import-untyped]  # no stubs, no py.typed
    from oslo_config import cfg

__all__ = ["BUS_EVENTS", "MessagingNotifier", "publisher_id"]

LOG = logging.getLogger(__name__)

#: the events Cinder sends to the bus
BUS_EVENTS: tuple[type[Event], ...] = (CacheHit, CacheMiss, CacheEvict)

#: how long the start-up check of the broker's credentials may take
PROBE_SECONDS = 2.0
#: the longest pause between two attempts at an event the broker did not take
MAX_BACKOFF = 2.0

_URL_OPTION = "[oslo_messaging_notifications] transport_url (or [DEFAULT] transport_url)"
_DRIVER_OPTION = "[oslo_messaging_notifications] driver"


def publisher_id(host: str) -> str:
    """Cinder's publisher id for a volume service on ``host``."""
    return f"volume.{host}"


class MessagingNotifier:
    """Publishes the cache's events to the bus, in order, from a sender thread."""

    def __init__(self, notifier: oslo_messaging.Notifier, *,
                 drain_seconds: float = 2.0) -> None:
        self._notifier = notifier
        self.drain_seconds = drain_seconds
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._sender: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def connect(cls, *, transport_url: str, host: str, driver: Sequence[str] = ("messagingv2",),
                topics: Sequence[str] = ("notifications",),
                drain_seconds: float = 2.0) -> MessagingNotifier:
        """A notifier on the bus ``transport_url`` names, checked now: a bad URL, driver or
        credentials raise ``ConfigError``; an unreachable broker is logged and waited for."""
        known = {e.name for e in entry_points(group="oslo.messaging.notify.drivers")}
        for name in driver:
            if name not in known:
                raise ConfigError(f"{_DRIVER_OPTION} = {name!r} is not an oslo.messaging "
                                  f"notification driver: one of {', '.join(sorted(known))}")
        if not transport_url:
            raise ConfigError(f"{_URL_OPTION} is not set: notifications on the bus need "
                              "the broker's URL (rabbit://USER:PASSWORD@HOST:5672/)")
        conf = cfg.ConfigOpts()
        conf(args=[], default_config_files=[], default_config_dirs=[])
        try:
            url = oslo_messaging.TransportURL.parse(conf, transport_url)
            if not url.hosts:
                raise ConfigError(f"{_URL_OPTION} names no broker host")
            transport = oslo_messaging.get_notification_transport(conf, url=transport_url)
        except (oslo_messaging.MessagingException, ValueError) as exc:
            # The URL itself is not repeated: it holds a password.
            raise ConfigError(f"{_URL_OPTION} is not a transport URL "
                              f"(rabbit://USER:PASSWORD@HOST:5672/): {_reason(exc)}") from None
        if url.transport == "rabbit":
            _check_credentials(url)
        # Notifier(driver=) takes one name; several are its configuration's, as in Cinder.
        group = "oslo_messaging_notifications"
        conf.set_override("driver", list(driver), group=group)
        conf.set_override("topics", list(topics), group=group)
        notifier = oslo_messaging.Notifier(
            transport, publisher_id=publisher_id(host),
            # Deliberate: retry until the broker is back. This runs in the sender thread
            # only, so a request never waits for it; close() bounds the wait at exit.
            retry=-1)
        return cls(notifier, drain_seconds=drain_seconds)

    def publish(self, event: Event) -> None:
        """Queue ``event`` for the bus if Cinder sends its kind; never waits for the bus."""
        if not isinstance(event, BUS_EVENTS):
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("publish after close")
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_all, daemon=True,
                                                name="ivcache-bus-sender")
                self._sender.start()
                # A library user who never calls close() still gets the drain at exit.
                atexit.register(self.close)
            self._queue.put(event)

    @property
    def pending(self) -> int:
        """Events queued or being sent."""
        return self._queue.unfinished_tasks

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for every queued event to be sent; return how many
        still wait."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.pending

    def close(self) -> int:
        """Stop taking events, wait up to ``drain_seconds`` for the queue to be sent; return
        (and log) how many were left undelivered."""
        with self._lock:
            self._closed = True
            sender = self._sender
        if sender is None:
            return 0
        atexit.unregister(self.close)
        left = self.flush(self.drain_seconds)
        if left:
            LOG.warning("%d cache event(s) not delivered to the bus within %g s: the broker "
                        "is unreachable; they are lost", left, self.drain_seconds)
        else:
            self._queue.put(None)
            sender.join(timeout=1)
        return left

    def _send_all(self) -> None:
        failures = _Failures(threading.get_ident())
        logging.getLogger("oslo_messaging.notify").addHandler(failures)
        try:
            while True:
                event = self._queue.get()
                try:
                    if event is None:
                        return
                    self._send(event, failures)
                finally:
                    self._queue.task_done()
        finally:
            logging.getLogger("oslo_messaging.notify").removeHandler(failures)

    def _send(self, event: Event, failures: _Failures) -> None:
        """Send ``event`` until oslo.messaging reports no failure (it raises none)."""
        backoff = 0.05
        while True:
            failures.failed = False
            try:
                self._notifier.info({}, event.name, event.payload())
            except Exception:
                # One event that cannot be serialised must not stop those behind it.
                LOG.exception("could not send %s to the bus", event.name)
                return
            if not failures.failed:
                return
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)


class _Failures(logging.Handler):
    """Notes an error that oslo.messaging's notify drivers log from one thread: the only
    sign that they dropped an event."""

    def __init__(self, thread: int) -> None:
        super().__init__(logging.ERROR)
        self.thread = thread
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.failed = True


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_credentials(url: Any) -> None:
    """Log in to the first reachable broker of ``url``: refused credentials are a
    ``ConfigError``; no reachable broker is only logged (the events will wait)."""
    # kombu (oslo.messaging's rabbit driver) only logs in here; it is not typed.
    import amqp.exceptions  # type: ignore[import-untyped]
    from kombu.connection import Connection

    vhost = url.virtual_host or "/"
    unreachable = []
    for host in url.hosts:
        probe: Any = Connection(  # type: ignore[no-untyped-call]
            hostname=host.hostname, port=host.port or 5672, userid=host.username or "guest",
            password=host.password or "guest", virtual_host=vhost, transport="pyamqp",
            connect_timeout=PROBE_SECONDS)
        try:
            probe.connect()
            return
        except (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed) as exc:
            raise ConfigError(f"{_URL_OPTION}: the broker at {host.hostname}:"
                              f"{host.port or 5672} refused the credentials of user "
                              f"{host.username or 'guest'!r} on vhost {vhost!r}: "
                              f"{_reason(exc)}") from None
        except Exception as exc:
            unreachable.append(f"{host.hostname}:{host.port or 5672} ({_reason(exc)})")
        finally:
            probe.release()
    LOG.warning("the bus is unreachable (%s): cache events wait for it",
                ", ".join(unreachable))
