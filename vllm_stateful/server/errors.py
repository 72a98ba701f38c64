"""One error format for everything the plugin answers: OpenAI's
``{"error": {"message", "type", "param", "code"}}``, with ``code`` a stable
machine-readable string (docs/api.md lists them) and ``type`` OpenAI's class
of error for the status. Errors that vLLM raises while serving a session
request (its request validation, its sampling-parameter checks, engine
failures) are converted to the same format, with vLLM's status and message.
"""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from vllm_stateful.sessions.store import SessionError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> SessionError:
    return SessionError(400, message, code, param=param)


def from_vllm(exc: BaseException) -> SessionError:
    """A vLLM exception as a SessionError with vLLM's own status, message and parameter."""
    from vllm.entrypoints.serve import create_error_response

    err = create_error_response(exc).error  # type: ignore[arg-type]
    code = "invalid_request" if err.code < 500 else "engine_unavailable"
    return SessionError(err.code, err.message, code, retry_after=1.0 if err.code == 503 else None, param=err.param)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(err: SessionError) -> JSONResponse:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        error_body(err.status, err.message, err.code, err.param), status_code=err.status, headers=headers
    )
