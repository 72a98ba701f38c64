"""OpenAI-style error responses: ``{"error": {"message", "type", "code", "param"}}``."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from vllm_stateful.sessions.store import SessionError

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> SessionError:
    err = SessionError(400, message, code)
    err.param = param  # type: ignore[attr-defined]
    return err


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "code": code,
            "param": param,
        }
    }


def error_response(err: SessionError) -> JSONResponse:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return JSONResponse(
        error_body(err.status, err.message, err.code, getattr(err, "param", None)),
        status_code=err.status,
        headers=headers,
    )
