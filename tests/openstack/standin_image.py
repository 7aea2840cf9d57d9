"""A stand-in for Glance: the image service Nova reads when it boots a server.

Nova asks the image service for an image's metadata when a server is created
(status, formats, minimum disk and RAM); the fake virt driver never downloads
the image. Glance itself is not installed in the real-OpenStack tier: what
the tests move is a running server, not an image. So this is a stand-in,
named as one: a WSGI application that answers the few Glance v2 calls Nova's
image API (python-glanceclient) makes, for one fixed public image,
``IMAGE_ID``. It checks no token: Keystone and keystonemiddleware guard the
real services of the tier, and nothing here is under test.
"""

from __future__ import annotations

import json
from typing import Any

IMAGE_ID = "155d900f-4e14-4e4c-a73d-069cbf4541e6"
IMAGE = {
    "id": IMAGE_ID,
    "name": "standin-cirros",
    "status": "active",
    "visibility": "public",
    "protected": False,
    "container_format": "bare",
    "disk_format": "raw",
    "size": 1024,
    "virtual_size": 1024,
    "min_disk": 0,
    "min_ram": 0,
    "checksum": "0" * 32,
    "owner": "admin",
    "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-01T00:00:00Z",
    "tags": [],
    "file": f"/v2/images/{IMAGE_ID}/file",
    "self": f"/v2/images/{IMAGE_ID}",
    "schema": "/v2/schemas/image",
}
# glanceclient builds its image model from this schema (warlock), and Nova
# tells an image's base attributes from its custom properties by it.
SCHEMA = {
    "name": "image",
    "properties": {name: {} for name in (*IMAGE, "locations", "direct_url")},
    "additionalProperties": {"type": "string"},
    "links": [],
}


def _versions(host: str) -> dict[str, Any]:
    return {
        "versions": [
            {
                "id": "v2.16",
                "status": "CURRENT",
                "links": [{"rel": "self", "href": f"http://{host}/v2/"}],
            }
        ]
    }


def application(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    path = environ.get("PATH_INFO", "/").rstrip("/")
    host = environ.get("HTTP_HOST", "127.0.0.1")
    status, body = "404 Not Found", {"message": f"no {path} in the stand-in image service"}
    if path in ("", "/v2", "/versions"):
        status, body = "200 OK", _versions(host)
    elif path == "/v2/schemas/image":
        status, body = "200 OK", SCHEMA
    elif path == f"/v2/images/{IMAGE_ID}":
        status, body = "200 OK", IMAGE
    elif path == "/v2/images":
        status, body = "200 OK", {"images": [IMAGE], "schema": "/v2/schemas/images"}
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
