"""Real Nova in one process: nova-api (WSGI), conductor, scheduler and two nova-compute.

Run by ``.venv-openstack``'s python (``real_cloud.RealNova`` starts it):
``python nova_services.py PORT_FILE HOST [HOST ...]``. Nova's configuration
comes from OS_NOVA_CONFIG_DIR / OS_NOVA_CONFIG_FILES, as for its WSGI API.

Why one process: the message bus is oslo.messaging's in-memory driver
(``transport_url = fake:/``), which connects only the services of one
process; this is how Nova's own functional tests run their services. Like
their RPC fixture, every transport Nova asks for (the API's, and a cell's,
``rpc.create_transport``) is this one bus, since the in-memory driver makes a
separate, unconnected bus per transport object. Nova runs on native threads
(its ``threading`` back end, which Nova 34 supports for every service), so
the API's WSGI server and the services share one interpreter without
eventlet.

The computes are started one after the other with ``CONF.host`` set to their
host name, as Nova's functional tests do (``start_service``), then mapped to
the cell (``nova-manage cell_v2 discover_hosts``'s function). The port file
is written once everything is up; the process serves until it is terminated
or its parent is gone.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

os.environ["OS_NOVA_DISABLE_EVENTLET_PATCHING"] = "1"
from nova import monkey_patch

monkey_patch.patch(backend="threading")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import standin_hypervisor  # noqa: E402
from serve_wsgi import QuietHandler, ThreadingWSGIServer, _exit_with_parent  # noqa: E402

# Nova loads ``compute_driver`` from the nova.virt package.
sys.modules["nova.virt.standin_hypervisor"] = standin_hypervisor


def _immediate_sqlite_transactions() -> None:
    """Make every SQLite transaction of Nova's ``BEGIN IMMEDIATE`` instead of ``BEGIN``.

    oslo.db begins SQLite transactions itself with a plain (deferred) ``BEGIN``. A
    deferred transaction that reads and then writes cannot wait for another writer:
    SQLite fails it at once ("database is locked") to avoid a deadlock. MySQL, as
    in a cloud, would make it wait. Nova's services share the database from many
    threads, so the read-then-write transactions (service heartbeats, instance
    actions, migrations) collide. Taking the write lock at ``BEGIN`` makes them
    queue behind each other (the busy ``timeout`` of the connection URLs) as they
    would on MySQL. This listener runs before oslo.db's, which then sees the
    transaction begun.
    """
    import sqlalchemy
    from sqlalchemy.engine import Engine

    @sqlalchemy.event.listens_for(Engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        if conn.engine.dialect.name == "sqlite" and "in_transaction" not in conn.info:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            conn.info["in_transaction"] = True


def main() -> None:
    port_file, hosts = sys.argv[1], sys.argv[2:]
    # oslo.config parses sys.argv: give it none of ours.
    sys.argv = [sys.argv[0]]
    from wsgiref.simple_server import make_server

    from nova import context, objects, rpc, service
    from nova.api.openstack import wsgi_app
    from nova.compute import rpcapi as compute_rpcapi
    from nova.objects import host_mapping
    from oslo_config import cfg

    conf = cfg.CONF
    _immediate_sqlite_transactions()
    app = wsgi_app.init_application("osapi_compute", "nova-api-os-compute")
    bus = rpc.TRANSPORT

    def one_bus(url: Any = None) -> Any:
        return bus

    rpc.create_transport = one_bus  # type: ignore[assignment]

    services: list[Any] = []

    def start(binary: str, host: str | None = None, **kwargs: Any) -> None:
        if host is not None:
            conf.set_override("host", host)
        svc = service.Service.create(binary=binary, host=host or conf.host, **kwargs)
        svc.start()
        services.append(svc)

    start("nova-conductor", topic="conductor")
    start("nova-scheduler", topic="scheduler")
    for host in hosts:
        start(
            "nova-compute",
            host,
            topic=compute_rpcapi.RPC_TOPIC,
            topic_alt=compute_rpcapi.RPC_TOPIC_ALT,
        )
    objects.register_all()
    host_mapping.discover_hosts(context.get_admin_context())

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
