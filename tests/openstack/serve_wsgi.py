"""Serve one OpenStack service's WSGI application on 127.0.0.1 (run by .venv-openstack's python).

Neutron 29 ships no neutron-server script and DevStack serves both Keystone
and Neutron under uWSGI; the tests need neither uWSGI nor a web server from
the system, so the standard library's WSGI server (one thread per request)
serves the real application object, ``keystone.wsgi.api:application`` or
``neutron.wsgi.api:application``. The service reads its configuration from
its usual variables (OS_KEYSTONE_CONFIG_FILES, OS_NEUTRON_CONFIG_FILES).

Usage: ``python serve_wsgi.py MODULE:ATTRIBUTE PORT_FILE``. It listens on a
free port, then writes that port to PORT_FILE (the parent waits for it) and
serves until terminated.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socketserver
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Keystone's discovery and the token checks of keystonemiddleware come in
    # bursts of connections: a longer backlog than the default 5.
    request_queue_size = 64


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """The services log each request themselves."""


def main() -> None:
    target, port_file = sys.argv[1], sys.argv[2]
    # The services parse sys.argv with oslo.config: give them none of ours.
    sys.argv = [sys.argv[0]]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    module, attribute = target.split(":")
    app = getattr(importlib.import_module(module), attribute)
    server = make_server(
        "127.0.0.1", 0, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler
    )
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    tmp = port_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(str(server.server_port))
    os.replace(tmp, port_file)
    server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
