"""Serve one OpenStack service's WSGI application on 127.0.0.1 (run by .venv-openstack's python).

Neutron 29 ships no neutron-server script and DevStack serves both Keystone
and Neutron under uWSGI; the tests need neither uWSGI nor a web server from
the system, so the standard library's WSGI server (one thread per request)
serves the real application object, ``keystone.wsgi.api:application`` or
``neutron.wsgi.api:application``. The service reads its configuration from
its usual variables (OS_KEYSTONE_CONFIG_FILES, OS_NEUTRON_CONFIG_FILES).

Usage: ``python serve_wsgi.py MODULE:ATTRIBUTE PORT_FILE [MODULE:LOCK]``. It
listens on a free port, then writes that port to PORT_FILE (the parent waits
for it) and serves until terminated. With a lock, requests run one at a time
under it: SQLite, unlike the MySQL of a cloud, fails two transactions that
read and then write at once ("database is locked", an HTTP 500) instead of
waiting, so Neutron's requests and its stand-in agents' reports (which take
the same lock) are serialized.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socketserver
import sys
import threading
import time
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Keystone's discovery and the token checks of keystonemiddleware come in
    # bursts of connections: a longer backlog than the default 5.
    request_queue_size = 64


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """The services log each request themselves."""


def _load(target: str) -> Any:
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def serialized(app: Any, lock: Any) -> Any:
    """``app`` answering one request at a time (its responses are lists, not streams)."""

    def locked(environ: dict[str, Any], start_response: Any) -> Any:
        with lock:
            return list(app(environ, start_response))

    return locked


def _exit_with_parent() -> None:
    """End when the test run that started this server is gone, even if it was killed
    without a chance to stop it (the server runs in a session of its own)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> None:
    target, port_file = sys.argv[1], sys.argv[2]
    lock_name = sys.argv[3] if len(sys.argv) > 3 else None
    # The services parse sys.argv with oslo.config: give them none of ours.
    sys.argv = [sys.argv[0]]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app = _load(target)
    if lock_name:
        app = serialized(app, _load(lock_name))
    server = make_server(
        "127.0.0.1", 0, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler
    )
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    _exit_with_parent()
    tmp = port_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(str(server.server_port))
    os.replace(tmp, port_file)
    server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
