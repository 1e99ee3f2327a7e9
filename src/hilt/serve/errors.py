"""Errors a client can cause, as OpenAI's JSON: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from pydantic import ValidationError

from hilt.serve.schemas import ErrorBody, ErrorResponse

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        error = ErrorBody(
            message=self.message,
            type=TYPES.get(self.status, "server_error"),
            param=self.param,
            code=self.code,
        )
        return ErrorResponse(error=error).model_dump()


def overloaded(message: str, retry_after: int = 1, code: str = "queue_full") -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after)})


def from_validation(error: ValidationError) -> APIError:
    """The first problem pydantic found, naming the field and what was sent."""
    first = error.errors(include_url=False)[0]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}")
    # union members add their type names to the location ('prompt', 'list[str]', 0): keep the field path
    path = [str(p) for p in first["loc"] if isinstance(p, int) or "[" not in str(p) and p not in _TYPE_TAGS]
    if not path:
        return APIError(400, message)
    sent = first.get("input")
    shown = f" (got {sent!r:.60})" if first["type"] != "missing" else ""
    return APIError(400, f"'{'.'.join(path)}': {message}{shown}", param=path[0])


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "constrained-int"}
