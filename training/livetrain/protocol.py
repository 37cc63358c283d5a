"""API server <-> training subprocess messages: msgpack maps over ZMQ, never pickle.

Every request is {"id": int, "op": str, ...}; every reply echoes "id" and has
"ok". A failed reply carries "kind" (how the API server should react) and "error".
"""

from __future__ import annotations

from typing import Any

import msgspec

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict)

# Reply kinds for failures. "refused": the request could not be honoured and
# nothing changed. "fatal": the trainer can no longer vouch for its state.
REFUSED = "refused"
FATAL = "fatal"


def encode(message: dict[str, Any]) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes) -> dict[str, Any]:
    return _decoder.decode(frame)


def failure(kind: str, error: str, status: int | None = None) -> dict[str, Any]:
    """A failed reply; `status` is the HTTP status the API server should answer with."""
    return {"ok": False, "kind": kind, "error": error, "status": status}
