"""Errors of the directory (NVA), one per HTTP status the API can answer with.

The server turns each into its status and a JSON body; the client turns the
status back into the same class with the server's message, so code that uses
the store in-process and code that uses it over HTTP catch the same
exceptions.
"""

from __future__ import annotations

from vmm_orchestrator.errors import TransientError
from vmm_orchestrator.httpapi import ApiError


class NvaError(ApiError):
    """Base of every directory error; ``http_status`` and ``code`` go on the wire."""


class BadRequest(NvaError):
    """The request is malformed: bad JSON, a wrong field type, an invalid MAC/IP/VNI."""

    http_status = 400
    code = "bad_request"


#: The name the contracts use for a refused value (an invalid MAC, address, VNI...): 400.
Invalid = BadRequest


class Unauthorized(NvaError):
    """The X-Auth-Token header is missing or does not match the server's token."""

    http_status = 401
    code = "unauthorized"


class NotFound(NvaError):
    """No such NVE, endpoint, pending migration or route."""

    http_status = 404
    code = "not_found"


class MethodNotAllowed(NvaError):
    """The route exists but not for this HTTP method."""

    http_status = 405
    code = "method_not_allowed"


class Conflict(NvaError):
    """The request contradicts the directory's state (duplicate address, stale seq, ...)."""

    http_status = 409
    code = "conflict"


class Gone(Conflict):
    """The changes a watcher asked for were pruned from the change log: it must re-sync.

    A Conflict, so that an agent that re-syncs on a Conflict also re-syncs on this.
    """

    http_status = 410
    code = "gone"


class PayloadTooLarge(NvaError):
    """The request body is larger than ``[nva] max_body_bytes``."""

    http_status = 413
    code = "payload_too_large"


class Unavailable(NvaError, TransientError):
    """The directory cannot be reached or did not answer in time: worth retrying."""

    http_status = 503
    code = "unavailable"


#: Status -> exception class, for the client to raise what the server meant.
BY_STATUS: dict[int, type[NvaError]] = {
    cls.http_status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        NotFound,
        MethodNotAllowed,
        Conflict,
        Gone,
        PayloadTooLarge,
        Unavailable,
    )
}
