"""One error root for the whole mesh.

``LocalProtocolError``: we were asked to build something the protocol forbids (a bug on our
side).  ``RemoteProtocolError``: a peer sent us something malformed; the receiving boundary
logs it, counts it, drops it and keeps serving.  ``ClientError``: what an HTTP client did wrong
(or what the mesh cannot do for it right now), with a stable ``code``, an HTTP ``status`` and
whether retrying can help.
"""


class MeshError(Exception):
    """Root of every livemesh error."""


class LocalProtocolError(MeshError):
    """We tried to encode something the protocol does not allow."""


class RemoteProtocolError(MeshError):
    """A peer sent a frame we cannot accept (bad version, malformed msgpack, wrong shape)."""


class ConfigError(MeshError):
    """A configuration value is missing or invalid; the message names the key."""


class KVError(MeshError):
    """The KV backend could not complete an operation (unreachable, rejected)."""


class ClientError(MeshError):
    """An error reported to an HTTP client as ``{"error": {"code", "message", "retryable"}}``."""

    def __init__(self, status: int, code: str, message: str, retryable: bool = False,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable
        self.headers = headers or {}  # fields the answer carries: Retry-After, WWW-Authenticate

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "retryable": self.retryable}}
