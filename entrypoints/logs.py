"""Logging for the ``ivcache`` command, set up as oslo.log sets it up for Cinder.

Cinder's options, in [DEFAULT]: ``log_file`` (relative to ``log_dir`` when both are set),
``log_dir`` alone (the file is ``ivcache.log`` there), ``debug`` (DEBUG instead of INFO).
The file gets INFO and up, the event lines of ``notifier = log`` included, in oslo.log's
default format. Standard error gets warnings, or INFO and up with ``--verbose``/``-v``;
the bus libraries' chatter (oslo.messaging, kombu, amqp, stevedore) and the format
inspector's warnings reach it only with ``debug``: ivcache says once that the bus is
unreachable, and once why an image is refused. alembic's INFO (on every command)
is left out unless ``debug``.

Only the CLI calls ``setup_logging``; the library leaves its user's logging alone.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ivcache.core.errors import ConfigError
from ivcache.entrypoints.config import Config

__all__ = ["FORMAT", "log_path", "setup_logging"]

#: oslo.log's default ``logging_default_format_string`` (less the request context)
FORMAT = "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s [-] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
#: Kept off stderr unless ``debug``: the bus libraries' retries (ivcache says once that the
#: bus is unreachable), and oslo.utils' format inspector, whose warnings say again what
#: ivcache's one error line says of a refused image.
_CHATTY = ("oslo_messaging", "kombu", "amqp", "stevedore", "oslo_utils")
#: INFO of these says nothing an operator acts on (alembic: "Context impl SQLiteImpl" on
#: every command); they log from WARNING up unless ``debug``
_TERSE = ("alembic",)


def log_path(config: Config) -> Path | None:
    """Where the log file is, as oslo.log decides it (``None``: no file). A relative
    ``log_dir`` is relative to the config file's folder, as every path of the file."""
    base = config.source.parent if config.source else config.home
    log_dir = base / Path(config.log_dir).expanduser() if config.log_dir else None
    if config.log_file:
        path = Path(config.log_file).expanduser()
        return path if path.is_absolute() else (log_dir or base) / path
    if log_dir is not None:
        return log_dir / "ivcache.log"
    return None


def _quiet_chatter(record: logging.LogRecord) -> bool:
    return not record.name.startswith(_CHATTY)


def setup_logging(config: Config, *, verbose: bool = False) -> None:
    """Configure the root logger for one CLI process from ``config``."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_ivcache", False)]:
        root.removeHandler(handler)
        handler.close()
    level = logging.DEBUG if config.debug else logging.INFO
    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    handlers: list[logging.Handler] = []
    path = log_path(config)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            to_file: logging.Handler = logging.FileHandler(path, encoding="utf-8", delay=False)
        except OSError as exc:
            raise ConfigError(f"cannot open the log file {path} ([DEFAULT] log_file / "
                              f"log_dir): {exc.strerror or exc}") from exc
        to_file.setLevel(level)
        handlers.append(to_file)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(level if verbose else logging.WARNING)
    if not config.debug:
        to_stderr.addFilter(_quiet_chatter)
    handlers.append(to_stderr)
    for handler in handlers:
        handler.setFormatter(formatter)
        # Our mark: a second call (a second command in one process) replaces these.
        handler._ivcache = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(min(h.level for h in handlers))
    for name in _TERSE:
        logging.getLogger(name).setLevel(logging.NOTSET if config.debug else logging.WARNING)
