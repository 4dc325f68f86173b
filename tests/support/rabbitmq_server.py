"""A throwaway RabbitMQ node for the tests and the benchmarks (not part of ivcache).

    server = RabbitServer.start()     # a node on free 127.0.0.1 ports, under a temp dir
    server.url                        # rabbit://guest:guest@127.0.0.1:PORT/
    server.stop(); server.restart()   # a broker outage and its end
    server.close()                    # stop the node by its PID, kill its epmd, remove files

Debian's ``rabbitmq-server`` (``apt-get install -y --no-install-recommends rabbitmq-server``).
``/usr/lib/rabbitmq/bin/rabbitmq-server`` is run directly: ``/usr/sbin``'s wrapper ``su``s to
the rabbitmq user and writes under /var. Everything the node writes (the Erlang cookie, its
database, its logs) stays under the temp dir; its epmd listens on a port of its own, so the
machine's 4369 is left alone, and is killed on close.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["RABBIT_BIN", "RabbitServer", "RabbitUnavailable", "rabbit_missing"]

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


class RabbitUnavailable(RuntimeError):
    """No node could be started here, with the reason."""


def rabbit_missing() -> str | None:
    """Why no node can be started here, or None."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        return ("no RabbitMQ (apt-get install -y --no-install-recommends rabbitmq-server)")
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RabbitServer:
    """A node this process started; ``stop``/``restart`` keep its data, ``close`` ends it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.node = f"ivtest{uuid.uuid4().hex[:8]}@localhost"
        self.epmd_port = _free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(directory),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(_free_port()),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq"),
        }
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "rabbitmq.conf").write_text("loopback_users = none\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rabbit://guest:guest@127.0.0.1:{self.port}/"

    @classmethod
    def start(cls, timeout: float = 60) -> RabbitServer:
        """A new node, up and answering; about 4 s."""
        reason = rabbit_missing()
        if reason:
            raise RabbitUnavailable(reason)
        server = cls(Path(tempfile.mkdtemp(prefix="ivcache-rabbit-")))
        try:
            server.restart(timeout)
        except BaseException:
            server.close()
            raise
        return server

    def restart(self, timeout: float = 60) -> None:
        """Start the node (again, after ``stop``) and wait until it answers."""
        log = open(self.directory / "server.out", "ab")  # noqa: SIM115  # the child owns it
        with log:
            self.process = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")], env=self.env, cwd=self.directory,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.directory / "server.out").read_text(errors="replace")[-2000:]
                raise RabbitUnavailable(f"rabbitmq-server exited {self.process.returncode}: "
                                        f"{tail}")
            if self._ctl("status", timeout=15).returncode == 0:
                return
            time.sleep(0.5)
        raise RabbitUnavailable(f"the node did not answer within {timeout:g} s")

    def stop(self) -> None:
        """Stop the node (its data stays, for ``restart``); by its PID if it does not go."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._ctl("stop", timeout=30)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            # The whole session: the shell script and the Erlang VM it started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def close(self) -> None:
        """Stop the node, kill the epmd it started (on its own port) and remove its files."""
        self.stop()
        epmd = shutil.which("epmd", path=os.pathsep.join(
            [os.environ.get("PATH", ""), *map(str, Path("/usr/lib/erlang").glob("erts-*/bin"))]))
        if epmd:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run([epmd, "-kill"], env=self.env, capture_output=True,
                               timeout=10, check=False)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _ctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-q", "-n", self.node,
                                   *args], env=self.env, capture_output=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(args, 1)

    def add_user(self, name: str, password: str) -> None:
        """A user with full rights on the default vhost (for a credentials test)."""
        for args in (("add_user", name, password),
                     ("set_permissions", "-p", "/", name, ".*", ".*", ".*")):
            done = self._ctl(*args, timeout=30)
            if done.returncode != 0:
                raise RabbitUnavailable(f"rabbitmqctl {args[0]} failed: {done.stderr!r}")


class BusListener:
    """An oslo.messaging notification listener on one topic that keeps what it receives.

    ``received`` holds ``(priority, publisher_id, event_type, payload, metadata)`` tuples in
    arrival order. Notifications sent before it starts wait in the topic's queue (the
    notifier declares it), so it may start after the senders.
    """

    def __init__(self, url: str, topic: str) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import oslo_messaging  # type: ignore[import-untyped]  # no stubs
            from oslo_config import cfg
        conf = cfg.ConfigOpts()
        conf(args=[], default_config_files=[], default_config_dirs=[])
        self.received: list[tuple[str, str, str, dict[str, object], dict[str, object]]] = []
        self._transport = oslo_messaging.get_notification_transport(conf, url=url)
        listener = self

        class Endpoint:
            def _keep(self, priority: str, publisher_id: str, event_type: str,
                      payload: dict[str, object], metadata: dict[str, object]) -> None:
                listener.received.append((priority, publisher_id, event_type, payload,
                                          metadata))

            def info(self, ctxt: object, publisher_id: str, event_type: str,
                     payload: dict[str, object], metadata: dict[str, object]) -> None:
                self._keep("info", publisher_id, event_type, payload, metadata)

            def warn(self, ctxt: object, publisher_id: str, event_type: str,
                     payload: dict[str, object], metadata: dict[str, object]) -> None:
                self._keep("warn", publisher_id, event_type, payload, metadata)

            def error(self, ctxt: object, publisher_id: str, event_type: str,
                      payload: dict[str, object], metadata: dict[str, object]) -> None:
                self._keep("error", publisher_id, event_type, payload, metadata)

        self._server = oslo_messaging.get_notification_listener(
            self._transport, [oslo_messaging.Target(topic=topic)], [Endpoint()],
            executor="threading")
        self._server.start()

    def wait_for(self, count: int, timeout: float = 20) -> list[
            tuple[str, str, str, dict[str, object], dict[str, object]]]:
        """What was received once ``count`` notifications arrived (or ``timeout`` passed),
        plus a short grace period to catch any extra."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        return list(self.received)

    def close(self) -> None:
        self._server.stop()
        self._server.wait()
        self._transport.cleanup()
