"""API server: the HTTP plumbing every plugin route shares (errors, bodies, validation)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError


class RequestError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.field, self.extra = status, field, extra

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "field": self.field, **self.extra}}
        return JSONResponse(body, status_code=self.status)


async def read_json(request: Request, limit: int, empty: Any = None) -> Any:
    """The parsed JSON body; `empty` stands in for a missing body where one is optional."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body is over {limit} bytes", field="body")
    if not body and empty is not None:
        return empty
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}", field="body") from None


Model = TypeVar("Model", bound=BaseModel)


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
