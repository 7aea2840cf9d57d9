"""What the state service and its clients share on the wire: headers,
constants, the error answers (one class per HTTP status, so a client raises
what the server meant) and the migration description header.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re

from vmm_orchestrator import httpapi as api
from vmm_orchestrator.errors import TransientError
from vmm_orchestrator.httpapi import TOKEN_HEADER as TOKEN_HEADER  # re-exported for the client
from vmm_orchestrator.httpapi import ApiError
from vmm_orchestrator.model import Migration
from vmm_orchestrator.statekind import Reason
from vmm_state.bundle import KIND_RE

MIGRATION_HEADER = "X-Vmm-Migration"
BUNDLE_TYPE = "application/vnd.vmm-state-bundle"

#: Pieces in which bundles are sent and received.
PIECE = 64 * 1024
#: Largest X-Vmm-Migration header accepted.
MAX_DESCRIPTION = 64 * 1024

MID_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
LABEL_RE = KIND_RE


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """This host's certificate and key, and the CA every peer's certificate must chain to."""

    cert: str
    key: str
    ca: str


# ------------------------------------------------------------------ errors


class ServiceError(ApiError):
    """An error answer of a state service; ``http_status`` and ``code`` go on the wire."""


class BadRequest(ServiceError, api.BadRequest):
    """The request is malformed (bad query, bad migration description)."""


class Unauthorized(ServiceError, api.Unauthorized):
    """The X-Auth-Token header is missing or wrong."""


class Forbidden(ServiceError, api.Forbidden):
    """The migration is not one this host may export or import for."""


class NotFound(ServiceError, api.NotFound):
    """No such route, or a migration this host does not know and was not described."""


class MethodNotAllowed(ServiceError, api.MethodNotAllowed):
    """The route exists but not for this method."""


class Conflict(ServiceError, api.Conflict):
    """The migration description contradicts the one this host already has."""


class Unavailable(ServiceError, api.Unavailable):
    """The service cannot answer now (its directory is unreachable, ...)."""


class TransferFailed(ServiceError, TransientError):
    """Client side: the peer could not be reached, timed out or broke off."""

    code = "transfer_failed"


BY_STATUS: dict[int, type[ServiceError]] = {
    cls.http_status: cls
    for cls in (BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, Conflict)
}


def reason_for(err: ServiceError) -> Reason:
    """The import reason a service error earns.

    Refusals (wrong token, a migration the peer will not serve) are the
    peer's policy: POLICY_CONFLICT. Everything else is a failed transfer.
    """
    if isinstance(err, Unauthorized | Forbidden | NotFound | Conflict):
        return Reason.POLICY_CONFLICT
    return Reason.TRANSFER_FAILED


def encode_migration(migration: Migration) -> str:
    data = json.dumps(migration.to_dict(), separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(data).decode("ascii")


def decode_migration(text: str) -> Migration:
    if len(text) > MAX_DESCRIPTION:
        raise BadRequest(f"{MIGRATION_HEADER} is longer than {MAX_DESCRIPTION} characters")
    try:
        data = json.loads(base64.urlsafe_b64decode(text.encode("ascii")))
        return Migration.from_dict(data)
    except (binascii.Error, UnicodeError, ValueError, KeyError, TypeError) as err:
        raise BadRequest(f"{MIGRATION_HEADER} is not a migration description: {err!r}") from None
