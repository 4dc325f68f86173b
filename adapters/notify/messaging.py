"""Cinder's cache notifications on the OpenStack bus, through oslo.messaging's ``Notifier``.

What a consumer of Cinder's notifications (Ceilometer's ``image_volume_cache.*`` event
definitions, any oslo.messaging notification listener) sees, as Cinder sends it:

- priority INFO, ``publisher_id`` ``volume.<host>``;
- ``event_type`` ``image_volume_cache.hit``, ``.miss`` or ``.evict`` (other events of the
  core, downloads and entry creations, are not Cinder's and stay off the bus);
- payload ``image_id`` and ``host`` as Cinder's, plus ivcache's ``entry_id``, ``outcome``
  (``miss`` or ``miss-uncached``) on a miss, ``reason`` and ``size_gb`` on an evict.

Never blocking, never lost: the event waits in an outbox (``SqlOutbox``, a table of the
cache's database, as wired by the CLI and the library; else ``MemoryOutbox``, this
process's memory) for one sender thread, which delivers the outbox in order, so a request
never waits for the broker. As wired, the outbox is filled by the unit of work, in the
transaction of the change each event announces (``attach_outbox`` with
``in_transactions``), and ``publish`` only wakes the sender; otherwise ``publish`` keeps
the event. The retry is decided here, not left to oslo.messaging: its ``Notifier`` runs
with ``retry = 0`` (its own retries would block the sender for as long as the broker is
down), and it logs and drops a message it could not send, raising
nothing. The sender notices that (the driver's error record, from its own thread), keeps
the message in the outbox and tries again with a backoff of up to ``MAX_BACKOFF`` seconds,
before anything behind it: a broker outage delays events and never reorders them. ``close``
(called at exit) waits at most ``drain_seconds``; what is left stays in the database for
the next ivcache process or ``ivcache events flush`` (in memory, it is lost, and logged).
At least once: an event may be sent twice (a sender that died between the send and the
delete; with several topics, a resend to all); its payload's ``event_id`` is then the same.

Bad configuration fails at construction (``connect``), naming the option: a malformed
``transport_url``, an unknown driver, a broker that refuses the credentials. A broker that
is merely unreachable then is not an error: the events wait for it.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol

from ivcache.adapters.sql.outbox import OutboxMessage
from ivcache.core.errors import ConfigError
from ivcache.core.events import CacheEvict, CacheHit, CacheMiss, Event

# oslo.messaging imports eventlet-era modules that warn about their own deprecation on import:
# nothing of ivcache's, and a CLI user would see it on every command.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import oslo_messaging  # type: ignore[import-untyped]  # no stubs, no py.typed
    from oslo_config import cfg

__all__ = ["BUS_EVENTS", "MemoryOutbox", "MessagingNotifier", "NotDelivered", "Outbox",
           "publisher_id"]

LOG = logging.getLogger(__name__)

#: the events Cinder sends to the bus
BUS_EVENTS: tuple[type[Event], ...] = (CacheHit, CacheMiss, CacheEvict)

#: how long the start-up check of the broker's credentials may take
PROBE_SECONDS = 2.0
#: the longest pause between two attempts at an event the broker did not take
MAX_BACKOFF = 2.0
#: how long the sender lets events gather into one batch
COALESCE_SECONDS = 0.05

_URL_OPTION = "[oslo_messaging_notifications] transport_url (or [DEFAULT] transport_url)"
_DRIVER_OPTION = "[oslo_messaging_notifications] driver"


def publisher_id(host: str) -> str:
    """Cinder's publisher id for a volume service on ``host``."""
    return f"volume.{host}"


class Outbox(Protocol):
    """Where events wait for the bus: ``SqlOutbox`` (the database), or ``MemoryOutbox``."""

    def add(self, event: Event) -> str: ...

    def pending(self) -> int: ...

    def deliver(self, send: Callable[[OutboxMessage], None]) -> int: ...


class MemoryOutbox:
    """Events waiting in this process only (lost with it): for a notifier without a
    database."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: collections.deque[OutboxMessage] = collections.deque()
        self._claimed = 0

    def add(self, event: Event) -> str:
        message_id = str(uuid.uuid4())
        with self._lock:
            self._waiting.append(OutboxMessage(message_id, event.name, event.payload()))
        return message_id

    def pending(self) -> int:
        with self._lock:
            return len(self._waiting) + self._claimed

    def deliver(self, send: Callable[[OutboxMessage], None]) -> int:
        sent = 0
        while True:
            with self._lock:
                if not self._waiting:
                    return sent
                message = self._waiting.popleft()
                self._claimed += 1
            try:
                send(message)
            except BaseException:
                with self._lock:
                    self._waiting.appendleft(message)
                raise
            finally:
                with self._lock:
                    self._claimed -= 1
            sent += 1


class NotDelivered(Exception):
    """oslo.messaging logged that it could not send a message (it raises nothing)."""


class MessagingNotifier:
    """Publishes the cache's events to the bus, in order, from a sender thread."""

    def __init__(self, notifier: oslo_messaging.Notifier, *, drain_seconds: float = 2.0,
                 outbox: Outbox | None = None) -> None:
        self._notifier = notifier
        self.drain_seconds = drain_seconds
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self._durable = outbox is not None
        self._in_transactions = False
        self._wake = threading.Event()
        self._sender: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        # One delivery at a time in this process (the sender, or send_now): batches go out
        # in order.
        self._delivering = threading.Lock()
        self._failures = _Failures()
        logging.getLogger("oslo_messaging.notify").addHandler(self._failures)
        if outbox is not None:
            # What an earlier process left is delivered by this one.
            self.attach_outbox(outbox)

    @classmethod
    def connect(cls, *, transport_url: str, host: str, driver: Sequence[str] = ("messagingv2",),
                topics: Sequence[str] = ("notifications",), drain_seconds: float = 2.0,
                outbox: Outbox | None = None) -> MessagingNotifier:
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
            # Deliberate: no retry inside oslo.messaging, whose retries block the sender
            # (with -1, for as long as the broker is down). The sender retries itself, with
            # a backoff, and a request never waits for either.
            retry=0)
        return cls(notifier, drain_seconds=drain_seconds, outbox=outbox)

    def attach_outbox(self, outbox: Outbox, *, in_transactions: bool = False) -> None:
        """Keep events in ``outbox`` (the database's) from now on; send what it holds.

        ``in_transactions``: the events reach ``outbox`` without this notifier (the unit of
        work writes them in the transactions of the changes they announce, as wired by
        ``SqlUnitOfWork(engine, outbox=...)``); ``publish`` then only wakes the sender.
        """
        self.outbox, self._durable = outbox, True
        self._in_transactions = in_transactions
        if outbox.pending():
            self._start()

    def publish(self, event: Event) -> None:
        """Keep ``event`` for the bus if Cinder sends its kind (in the outbox, so in the
        database when there is one; unless the transaction that announced it did) and wake
        the sender; never waits for the bus."""
        if not isinstance(event, BUS_EVENTS):
            return
        with self._lock:
            if self._closed:
                if self._in_transactions:
                    return  # committed in the outbox: the next process sends it
                raise RuntimeError("publish after close")
        if not self._in_transactions:
            self.outbox.add(event)
        self._start()

    @property
    def pending(self) -> int:
        """Events waiting or being sent."""
        return self.outbox.pending()

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the sender to send every waiting event; return
        how many still wait."""
        deadline = time.monotonic() + timeout
        self._start()
        while (left := self.pending) and time.monotonic() < deadline:
            time.sleep(0.02)
        return left

    def send_now(self) -> tuple[int, int]:
        """Send what waits from this thread, until done or the bus fails: (sent, left)."""
        sent = 0
        try:
            with self._delivering:
                while batch := self.outbox.deliver(self._send):
                    sent += batch
        except NotDelivered:
            pass
        return sent, self.pending

    def close(self) -> int:
        """Stop taking events, wait up to ``drain_seconds`` for the sender; return (and log)
        how many were left undelivered."""
        with self._lock:
            self._closed = True
            sender = self._sender
        left = self.flush(self.drain_seconds) if sender is not None else self.pending
        if sender is not None:
            atexit.unregister(self.close)
        if left and self._durable:
            LOG.warning("%d cache event(s) wait in the outbox: the bus did not take them "
                        "within %g s; the next ivcache process or `ivcache events flush` "
                        "sends them", left, self.drain_seconds)
        elif left:
            LOG.warning("%d cache event(s) not delivered to the bus within %g s: the broker "
                        "is unreachable; they are lost", left, self.drain_seconds)
        logging.getLogger("oslo_messaging.notify").removeHandler(self._failures)
        self._wake.set()
        return left

    def _start(self) -> None:
        with self._lock:
            if self._sender is None and not self._closed:
                self._sender = threading.Thread(target=self._send_all, daemon=True,
                                                name="ivcache-bus-sender")
                self._sender.start()
                # A library user who never calls close() still gets the drain at exit.
                atexit.register(self.close)
        self._wake.set()

    def _send_all(self) -> None:
        backoff = 0.05
        while True:
            self._wake.wait(timeout=1.0)
            # A moment for the events of the same burst to join one batch: fewer database
            # transactions beside the requests'.
            time.sleep(COALESCE_SECONDS)
            self._wake.clear()
            try:
                with self._delivering:
                    while self.outbox.deliver(self._send):
                        pass
                backoff = 0.05
            except NotDelivered:
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                self._wake.set()
            except Exception:
                LOG.exception("the bus sender failed; it tries again")
                time.sleep(MAX_BACKOFF)
                self._wake.set()
            if self._closed and not self.outbox.pending():
                return

    def _send(self, message: OutboxMessage) -> None:
        """One message to the bus; ``NotDelivered`` when oslo.messaging dropped it."""
        me = threading.get_ident()
        self._failures.failed.discard(me)
        # event_id: the outbox's id, the same if the event is ever sent twice (oslo.messaging
        # gives each send its own envelope message_id).
        self._notifier.info({}, message.event_type, {**message.payload,
                                                     "event_id": message.message_id})
        if me in self._failures.failed:
            raise NotDelivered(message.event_type)


class _Failures(logging.Handler):
    """Notes the threads from which oslo.messaging's notify drivers logged an error: the
    only sign that they dropped a message."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.failed: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread is not None:
            self.failed.add(record.thread)


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
