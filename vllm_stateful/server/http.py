"""HTTP plumbing shared by the plugin's routes: bounded body reading, JSON
parsing off the event loop, one error format, and cancellation when a client
disconnects while a non-streaming request is still running."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from vllm_stateful.server.errors import bad_request, error_response, from_vllm
from vllm_stateful.sessions.chat_render import TemplateNotPrefixStable
from vllm_stateful.sessions.ids import is_valid_session_id
from vllm_stateful.sessions.store import SessionError

logger = logging.getLogger(__name__)

# Answered when the client went away first (nginx's convention; nobody reads it).
CLIENT_CLOSED_REQUEST = 499


def too_large(limit: int) -> SessionError:
    return SessionError(413, f"request body is larger than {limit} bytes", "request_too_large")


async def read_body(raw_request: Request, limit: int | None) -> bytes:
    """The request body; 413 as soon as it exceeds ``limit`` bytes (None: no limit)."""
    if limit is not None:
        declared = raw_request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in raw_request.stream():
            size += len(chunk)
            if limit is not None and size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise SessionError(CLIENT_CLOSED_REQUEST, "the client closed the connection", "client_closed") from None
    return b"".join(chunks)


async def parse_object(body: bytes, parse: Callable[[bytes], Awaitable[Any]]) -> dict[str, Any]:
    """The body as a JSON object; 400 for anything else (NaN and Infinity are not JSON)."""
    try:
        value = await parse(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad_request("request body must be valid JSON (without NaN or Infinity)") from None
    if not isinstance(value, dict):
        raise bad_request("request body must be a JSON object")
    return value


def validated(model: type, body: dict[str, Any]):
    """``model.model_validate(body)``, a 400 naming the first bad field otherwise."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg", "invalid value"))[:500]
        raise bad_request(f"{loc}: {message}" if loc else message, param=loc or None) from None
    except Exception as exc:  # vLLM's own validators may raise their exceptions directly
        err = from_vllm(exc)
        raise (err if err.status < 500 else bad_request(str(exc)[:500])) from None


def checked_id(value: Any, param: str = "stateful") -> str:
    if not is_valid_session_id(value):
        raise bad_request("session id must be 1-128 characters of A-Za-z0-9._:-", "invalid_session_id", param)
    return value


class LeftToVLLM(Exception):
    """Wraps an error raised by one of vLLM's own handlers: re-raised as is, for
    vLLM's exception handlers to answer exactly as stock vLLM does."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def guarded(handler: Callable[..., Awaitable[Response]]):
    """Turn refusals into OpenAI-style error responses; an unexpected error is a 500 in the same format."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Response:
        try:
            return await handler(*args, **kwargs)
        except LeftToVLLM as wrapped:
            raise wrapped.error from None
        except SessionError as err:
            return error_response(err)
        except TemplateNotPrefixStable as err:
            return error_response(bad_request(str(err), "template_not_prefix_stable"))
        except Exception:
            logger.exception("vllm-stateful: unexpected error")
            return error_response(
                SessionError(500, "internal error in vllm-stateful; see server log", "internal_error")
            )

    return wrapper


async def cancel_on_disconnect(raw_request: Request, work: Awaitable[Response]) -> Response:
    """Await ``work``, cancelling it if the client disconnects first.

    The body must already have been read. vLLM's ``with_cancellation`` does the
    same for its handlers but reads the body itself; a returned streaming
    response takes over disconnect detection from here.
    """
    from vllm.entrypoints.serve.utils.api_utils import listen_for_disconnect

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(listen_for_disconnect(raw_request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:
        pass
    return Response(status_code=CLIENT_CLOSED_REQUEST)
