"""Errors of the directory (NVA), one per HTTP status the API can answer with.

The server turns each into its status and a JSON body; the client turns the
status back into the same class with the server's message, so code that uses
the store in-process and code that uses it over HTTP catch the same
exceptions.
"""

from __future__ import annotations

from vmm_orchestrator import httpapi as api
from vmm_orchestrator.httpapi import ApiError


class NvaError(ApiError):
    """Base of every directory error; ``http_status`` and ``code`` go on the wire."""


class BadRequest(NvaError, api.BadRequest):
    """The request is malformed: bad JSON, a wrong field type, an invalid MAC/IP/VNI."""


#: The name the contracts use for a refused value (an invalid MAC, address, VNI...): 400.
Invalid = BadRequest


class Unauthorized(NvaError, api.Unauthorized):
    """The X-Auth-Token header is missing or does not match the server's token."""


class Forbidden(NvaError, api.Forbidden):
    """403: the token is an NVE's, scoped to its own records (issue 13); nothing changed."""


class NotFound(NvaError, api.NotFound):
    """No such NVE, endpoint, pending migration or route."""


class MethodNotAllowed(NvaError, api.MethodNotAllowed):
    """The route exists but not for this HTTP method."""


class Conflict(NvaError, api.Conflict):
    """The request contradicts the directory's state (duplicate address, stale seq, ...)."""


class Gone(Conflict, api.Gone):
    """The changes a watcher asked for were pruned from the change log: it must re-sync.

    A Conflict, so that an agent that re-syncs on a Conflict also re-syncs on this.
    """


class PayloadTooLarge(NvaError, api.PayloadTooLarge):
    """The request body is larger than ``[nva] max_body_bytes``."""


class Unavailable(NvaError, api.Unavailable):
    """The directory cannot be reached or did not answer in time: worth retrying."""


#: Status -> exception class, for the client to raise what the server meant.
BY_STATUS: dict[int, type[NvaError]] = {
    cls.http_status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        Gone,
        PayloadTooLarge,
        Unavailable,
    )
}
