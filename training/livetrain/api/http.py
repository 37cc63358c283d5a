"""API server: the HTTP plumbing every plugin route shares (errors, bodies, validation).

A POST body must say it is JSON (a page the operator visits cannot send one without
a CORS preflight, which these routes do not answer), is capped in size while it
streams in, and is parsed and validated off the event loop, so a large accepted body
never stalls the server's other requests.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class RequestError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.field, self.extra = status, field, extra

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "field": self.field, **self.extra}}
        return JSONResponse(body, status_code=self.status)


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}", field="body") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply", field="body") from None


async def read_json(request: Request, limit: int, empty: Any = None) -> Any:
    """The parsed JSON body; `empty` stands in for a missing body where one is optional."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body is over {limit} bytes", field="body")
    if not body and empty is not None:
        return empty
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(
            415, f"the body must be application/json, not {kind or 'unlabelled'}", field="body"
        )
    return await asyncio.to_thread(_loads, bytes(body))


async def parse(
    request: Request, model: type[Model], limit: int, context: dict[str, Any], empty: Any = None
) -> Model:
    """`read_json`, then `validate` in a worker thread."""
    data = await read_json(request, limit, empty)
    return await asyncio.to_thread(validate, model, data, context)


def validate(model: type[Model], data: Any, context: dict[str, Any]) -> Model:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        message = f"{field or 'body'}: {first['msg']}"
        details = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        raise RequestError(422, message, field=field, details=details) from None
