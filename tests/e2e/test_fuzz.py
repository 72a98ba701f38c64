"""Fuzz every HTTP route of the plugin with hypothesis, against the real server.

Hardening contract checked after every single request:

* no response is a 5xx (a 200 stream that ends in an error event counts as a
  rejection, and its error must not be a 5xx either);
* a rejected request (4xx, or a stream ending in an error event) answers the
  OpenAI error format ``{"error": {"message", "type", "param", "code"}}``;
  ``code`` is a string wherever the plugin answers (vLLM's own stateless
  handler answers its own format with an integer code; vLLM's API-key
  middleware answers ``{"error": "Unauthorized"}``);
* the "victim" session of tenant A (a chat history with appends) is exactly
  unchanged (token ids, version, pinned blocks, context tokens, state, queue,
  ttl) unless the request was accepted *on the victim* as tenant A and the
  response says it committed (version + 1): then the new history must extend
  the old one by exactly one version, and it becomes the new reference;
* no session appears or disappears for tenant A or B unless the request was
  accepted (sessions an accepted request creates are deleted at once, and that
  delete must succeed), so a refused first request leaves nothing behind;
* the integrity report has no problems (after every accepted request and
  periodically).

At the end every session the run created is gone, the pool's free blocks and
the ledger's charged blocks are back to the baseline, and a summary line with
the counts is printed (``pytest -s``).

Requests are mostly schema-aware mutations of valid bodies (a field, anywhere
in the body, replaced by random JSON or by NaN/Infinity, which the server
refuses as invalid JSON; fields dropped; known-but-refused and unknown fields
added), plus whole random JSON bodies, non-JSON bodies and bodies over the
size limit, with valid, fresh and invalid session ids, the header alias, the
other tenant's key, a bad key and none. Cost guard: a chat/completions body
always has a small output bound (``max_tokens``/``max_completion_tokens``
from 5 up to the context length become 4, a missing bound becomes 3) and a
stateless one has ``n``/``best_of`` of at most 2, so accepted requests stay
cheap. ``REGRESSIONS`` are fixed requests (bugs the fuzz found) that run
first, every time.
"""

from __future__ import annotations

import collections
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tests.e2e.conftest import KEY_A, KEY_B, MAX_BODY_BYTES, MAX_MODEL_LEN

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 1200
VICTIM = "fuzz-victim"
TIMEOUT_S = 60.0

ROUTES = {
    "chat": ("POST", "/v1/chat/completions"),
    "completions": ("POST", "/v1/completions"),
    "create": ("POST", "/v1/sessions"),
    "list": ("GET", "/v1/sessions"),
    "get": ("GET", "/v1/sessions/{id}"),
    "delete": ("DELETE", "/v1/sessions/{id}"),
    "append": ("POST", "/v1/sessions/{id}/append"),
    "integrity": ("GET", "/v1/stateful/debug/integrity"),
    "flash_register": ("POST", "/v1/sessions/{id}/flash_queries"),
    "flash_list": ("GET", "/v1/sessions/{id}/flash_queries"),
    "flash_get": ("GET", "/v1/sessions/{id}/flash_queries/{fid}"),
    "flash_delete": ("DELETE", "/v1/sessions/{id}/flash_queries/{fid}"),
    "events": ("GET", "/v1/sessions/{id}/events"),
}
# The victim's flash query (registered at setup); "{known_fid}" in a path is replaced by its id at run time.
KNOWN_FID = "{known_fid}"
# Drawn with these weights: the body-taking routes get most of the budget.
ROUTE_WEIGHTS = {
    "chat": 30,
    "completions": 24,
    "create": 12,
    "append": 18,
    "get": 6,
    "list": 3,
    "delete": 5,
    "integrity": 4,
    "flash_register": 8,
    "flash_list": 2,
    "flash_get": 5,
    "flash_delete": 3,
    "events": 3,
}
SERVER_ERROR_TYPES = ("server_error", "service_unavailable_error")  # a 5xx, in an error body
AUTHS = {"A": f"Bearer {KEY_A}", "B": f"Bearer {KEY_B}", "bad": "Bearer not-a-key", "none": None}
AUTH_WEIGHTS = {"A": 88, "B": 6, "bad": 3, "none": 3}

# --- random JSON -------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 2, 3, 4, 5, 2**31, -(2**31), 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30)]
EDGE_FLOATS = [0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e308, -1e308, 5e-324, 1e-300, 2.0**63]
NONFINITE = [math.nan, math.inf, -math.inf]  # not JSON, but Python's json (the server's parser) reads them
# fmt: off
WEIRD_TEXT = [
    "", " ", "\n", "a\nb", "\r\n", "\x00", "\u202e", "é", "日本語", "🦜", "\ud7ff", "\ufeff",
    "\ud800", "a\udfffb",  # lone surrogates: only JSON's \u escape can carry them
    "<|im_start|>", "<|im_end|>", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "{{ 1 }}", "{% if %}",
    "null", "true", "0", "-1", "4", "1e308", "NaN", "user", "assistant", "system", "tool", "tiny",
    "stateful_session", "x" * 300, "a" * 129,
]
# fmt: on
KNOWN_FIELDS = (
    # honoured in sessions
    "model max_tokens max_completion_tokens n stream stream_options temperature top_p top_k min_p seed stop "
    "stop_token_ids include_stop_str_in_output ignore_eos min_tokens frequency_penalty presence_penalty "
    "repetition_penalty logit_bias allowed_token_ids bad_words skip_special_tokens spaces_between_special_tokens "
    "response_format structured_outputs priority request_id user return_token_ids return_tokens_as_token_ids "
    "vllm_xargs session_id parallel_tool_calls "
    # refused in sessions
    "logprobs top_logprobs prompt_logprobs echo suffix tools tool_choice cache_salt chat_template "
    "chat_template_kwargs add_generation_prompt continue_final_message truncate_prompt_tokens best_of "
    "use_beam_search length_penalty documents mm_processor_kwargs kv_transfer_params prompt_embeds "
    "add_special_tokens "
    # the plugin's own
    "stateful ark_stateful stateful_commit id ttl_s text token_ids wait messages prompt"
).split()
COST_FIELDS = ("max_tokens", "max_completion_tokens")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EDGE_INTS),
    st.integers(),
    st.sampled_from(EDGE_FLOATS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(WEIRD_TEXT),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(KNOWN_FIELDS)), inner, max_size=4),
    ),
    max_leaves=10,
)

# --- session ids ----------------------------------------------------------------------

valid_ids = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True).filter(lambda s: s != VICTIM)
# fmt: off
_INVALID_IDS = [
    "", "a\n", "a\nb", " a", "a ", "a b", "x" * 129, "x" * 200, "../x", "a/b", "a?b", "a#b", "a%b", "ü", "🦜",
    "\x00", "a\tb", VICTIM + "\n", VICTIM + " ", "sess_" + "0" * 124 + "!",
]
# fmt: on
invalid_ids = st.one_of(
    st.sampled_from(_INVALID_IDS),
    st.text(min_size=1, max_size=140).filter(lambda s: re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", s) is None),
)


def _path_safe(sid: str) -> bool:
    """An id that routes to ``{session_id}`` once percent-encoded (not empty, no '/')."""
    return sid != "" and "/" not in sid


def _header_safe(sid: str) -> bool:
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in sid) and sid == sid.strip(" \t")


# --- valid bodies -----------------------------------------------------------------------


def _texts(min_size: int = 1) -> st.SearchStrategy[str]:
    alphabet = st.characters(codec="utf-8", exclude_categories=("Cs",))
    return st.one_of(
        st.text(alphabet, min_size=min_size, max_size=30),
        st.sampled_from([t for t in WEIRD_TEXT if len(t) >= min_size]),
        st.sampled_from(["Hello there.", "What next?", "Summarize.", "2+2=", "Tell me more about Lisbon."]),
    )


messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "user", "user", "system", "assistant", "tool"]),
            "content": st.one_of(
                _texts(0),
                st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _texts(0)}), min_size=1, max_size=2),
            ),
        },
        optional={"name": st.sampled_from(["bob", "x"])},
    ),
    min_size=1,
    max_size=2,
)


def _sampling_extras(chat: bool) -> st.SearchStrategy[dict]:
    optional = {
        "model": st.just("tiny"),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.1, 1),
        "top_k": st.one_of(st.just(-1), st.integers(1, 50)),
        "seed": st.integers(0, 1000),
        "stop": st.one_of(_texts(), st.lists(_texts(), min_size=1, max_size=3)),
        "stream": st.booleans(),
        "return_token_ids": st.booleans(),
        "ignore_eos": st.booleans(),
        "min_tokens": st.integers(0, 1),
        "repetition_penalty": st.floats(0.5, 2),
        "stateful_commit": st.sampled_from([True, True, False]),
        "priority": st.integers(-3, 3),
        "user": _texts(),
        "stop_token_ids": st.lists(st.integers(0, 100), max_size=3),
    }
    if chat:
        optional["max_completion_tokens"] = st.integers(1, 4)
    return st.fixed_dictionaries({}, optional=optional)


def _token_ids(vocab: int, max_size: int = 20) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, vocab - 1), min_size=1, max_size=max_size)


def _valid_body(route: str, vocab: int) -> st.SearchStrategy[dict]:
    if route == "chat":
        base = st.fixed_dictionaries({"messages": messages, "max_tokens": st.integers(1, 4)})
        return st.tuples(base, _sampling_extras(chat=True)).map(lambda t: {**t[0], **t[1]})
    if route == "completions":
        prompt = st.one_of(_texts(), _token_ids(vocab), _texts().map(lambda s: [s]))
        base = st.fixed_dictionaries({"prompt": prompt, "max_tokens": st.integers(1, 4)})
        return st.tuples(base, _sampling_extras(chat=False)).map(lambda t: {**t[0], **t[1]})
    if route == "create":
        return st.fixed_dictionaries(
            {},
            optional={
                "ttl_s": st.one_of(st.floats(1, 86400), st.integers(1, 86400)),
                "prompt": st.one_of(_texts(), _token_ids(vocab)),
            },
        ) | st.fixed_dictionaries({"messages": messages})
    if route == "append":
        content = st.one_of(
            st.fixed_dictionaries({"text": _texts()}),
            st.fixed_dictionaries({"token_ids": _token_ids(vocab)}),
            st.fixed_dictionaries({"messages": messages}),
        )
        return st.tuples(content, st.fixed_dictionaries({}, optional={"wait": st.booleans()})).map(
            lambda t: {**t[0], **t[1]}
        )
    if route == "flash_register":
        question = st.one_of(
            st.fixed_dictionaries({"prompt": st.one_of(_texts(), _token_ids(vocab))}),
            st.fixed_dictionaries({"messages": messages}),
        )
        base = st.tuples(
            question,
            st.fixed_dictionaries({"max_tokens": st.integers(1, 4)}, optional={"name": _texts()}),
            _sampling_extras(chat=False).map(lambda d: {k: v for k, v in d.items() if not k.startswith("stateful")}),
        )
        return base.map(lambda t: {**t[0], **t[1], **t[2]})
    return st.just({})


# --- mutations ---------------------------------------------------------------------------


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location inside a JSON value (dict keys, list indices), outermost first."""
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


def _set(body: Any, path: tuple, value: Any, drop: bool = False) -> None:
    node = body
    for p in path[:-1]:
        node = node[p]
    if drop:
        del node[path[-1]]
    else:
        node[path[-1]] = value


@st.composite
def _mutated(draw, body: dict) -> tuple[Any, list[str]]:
    """``body`` with 0-3 mutations; returns (new body, what was done)."""
    body = json.loads(json.dumps(body))
    done: list[str] = []
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 1, 2, 2, 3]))):
        op = draw(st.sampled_from(["replace"] * 5 + ["nonfinite", "drop", "drop", "add_known"] * 1 + ["add_unknown"]))
        paths = _paths(body)
        if op in ("replace", "nonfinite", "drop") and paths:
            path = draw(st.sampled_from(paths))
            if op == "drop":
                if path[-1] in COST_FIELDS and len(path) == 1:
                    continue
                _set(body, path, None, drop=True)
            else:
                value = draw(json_values if op == "replace" else st.sampled_from(NONFINITE))
                _set(body, path, value)
            done.append(f"{op} {'.'.join(map(str, path))}")
        elif op == "add_known":
            key = draw(st.sampled_from(KNOWN_FIELDS))
            body[key] = draw(st.one_of(json_values, st.sampled_from(NONFINITE)))
            done.append(f"add {key}")
        else:
            key = draw(st.text(min_size=1, max_size=12))
            body[key] = draw(json_values)
            done.append(f"add unknown {key!r}")
    return body, done


# fmt: off
RAW_BODIES = [
    b"", b"{", b"}", b"nul", b"null", b"[]", b"[1, 2", b"0", b'"x"', b"\xff\xfe\x00", b'{"a": 1} trailing',
    b'{"max_tokens": 1, "max_tokens": 2}', b"\xef\xbb\xbf{}", b"{'single': 'quotes'}", b'{"x": 1e999999}',
    b"[" * 50_000 + b"]" * 50_000, b'{"a":' * 3_000 + b"1" + b"}" * 3_000,
    b'{"stateful": "' + VICTIM.encode() + b'", "messages": ' + b"[" * 900 + b"]" * 900 + b"}",
    b'{"stateful": "' + VICTIM.encode() + b'", "prompt": "\\ud800", "max_tokens": 1}',
    b'{"stateful": "' + VICTIM.encode() + b'", "prompt": "caf\xe9", "max_tokens": 1}',
]
# fmt: on


@dataclass
class Case:
    route: str
    method: str
    path: str
    auth: str  # A, B, bad, none
    headers: dict[str, bytes]
    params: dict[str, str]
    content: bytes | None
    body: Any  # the JSON value sent (None for raw bodies)
    notes: list[str]
    session_id: Any = None  # the session the server will resolve (best effort), for counting

    def describe(self) -> dict:
        text = (self.content or b"").decode("utf-8", "backslashreplace")
        return {
            "method": self.method,
            "path": self.path,
            "params": self.params,
            "auth": self.auth,
            "headers": {k: v.decode("utf-8", "backslashreplace") for k, v in self.headers.items()},
            "body": text if len(text) <= 1500 else text[:1500] + f"...({len(text)} chars)",
            "mutations": self.notes,
        }


def _numberish(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _ttl_guard(body: Any) -> None:
    """A valid TTL under a minute becomes a minute: a session created by a case must still exist
    when the case's cleanup deletes it, however long this process is stopped in between (TTL
    expiry has its own tests)."""
    ttl = body.get("ttl_s") if isinstance(body, dict) else None
    if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and 0 < ttl < 60:
        body["ttl_s"] = 60


def _cost_guard(body: Any, stateless: bool) -> None:
    if not isinstance(body, dict):
        return
    for k in COST_FIELDS:
        n = _numberish(body.get(k))
        if n is not None and 4 < n <= MAX_MODEL_LEN and n == int(n):  # over the context: cheap refusals
            body[k] = 4
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 3
    if stateless:
        for k in ("n", "best_of"):
            n = _numberish(body.get(k))
            if n is not None and n > 2:
                body[k] = 2


def _openai_session_id(body: Any, header: bytes | None) -> Any:
    """The session the server resolves: body ``stateful``/``ark_stateful`` first, then the header."""
    if isinstance(body, dict):
        for f in ("stateful", "ark_stateful"):
            if f in body:
                return body[f]
    return None if header is None else header.decode("latin-1")


@st.composite
def cases(draw, vocab: int, preexisting: frozenset) -> Case:
    route = draw(st.sampled_from([r for r, w in ROUTE_WEIGHTS.items() for _ in range(w)]))
    auth = draw(st.sampled_from([a for a, w in AUTH_WEIGHTS.items() for _ in range(w)]))
    method, path = ROUTES[route]
    fresh = valid_ids.filter(lambda s: s not in preexisting)
    kind = draw(st.sampled_from(["victim"] * 6 + ["fresh"] * 3 + ["invalid"] * 2))
    if route == "delete" and auth == "A" and kind == "victim":
        kind = "fresh"  # tenant A may not delete the victim; tenant B and the rest may try
    if kind == "victim":
        sid = VICTIM
    elif kind == "fresh":
        sid = draw(fresh)
    else:
        sid = draw(invalid_ids)
    headers: dict[str, bytes] = {"content-type": b"application/json"}
    params: dict[str, str] = {}
    notes: list[str] = [f"target {kind}"]
    if "{id}" in path:
        if not _path_safe(sid):
            sid = draw(st.sampled_from([s for s in _INVALID_IDS if _path_safe(s)]))
        path = path.replace("{id}", quote(sid, safe="").replace(".", "%2E"))
    if "{fid}" in path:
        fid = draw(st.sampled_from([KNOWN_FID] * 3 + ["fq-0", "fq-" + "0" * 24, "x", "%2E%2E", "\u00e9" * 3]))
        if route == "flash_delete" and kind == "victim" and auth == "A" and fid == KNOWN_FID:
            fid = "fq-" + "1" * 24  # tenant A may not delete the victim's known query; others may try
        path = path.replace("{fid}", fid if fid == KNOWN_FID else quote(fid, safe="%"))
    if route in ("get", "list", "integrity", "flash_get") and draw(st.booleans()):
        params["include_tokens"] = draw(
            st.one_of(st.sampled_from(["true", "1", "TRUE", "false", ""]), st.text(max_size=5))
        )
    if route == "flash_get":
        for name in ("min_version", "wait_s"):
            if draw(st.booleans()):
                params[name] = draw(
                    st.one_of(
                        st.sampled_from(["0", "1", "7", "-1", "0.01", "nan", "inf", "1e9", "x", ""]),
                        st.text(max_size=4),
                    )
                )
    if route == "events" and draw(st.booleans()):
        headers["last-event-id"] = draw(st.sampled_from([b"0", b"1", b"-1", b"x", b"99999999999", b"1e3", b""]))
    body: Any = None
    content: bytes | None = None
    if method == "POST":
        shape = draw(st.sampled_from(["mutated"] * 17 + ["random_json", "raw", "oversize"]))
        notes.append(shape)
        if shape == "raw":
            content = draw(st.one_of(st.sampled_from(RAW_BODIES), st.binary(max_size=64)))
        else:
            if shape == "random_json":
                body = draw(json_values)
            else:
                valid = draw(_valid_body(route, vocab))
                if route == "create" and (kind != "fresh" or draw(st.booleans())):
                    valid["id"] = sid  # the victim (409), an invalid id, a fresh id (else server-generated)
                body, done = draw(_mutated(valid)) if shape == "mutated" else (valid, [])
                notes += done
            if route in ("chat", "completions") and shape != "raw":
                where = draw(st.sampled_from(["stateful"] * 7 + ["ark_stateful", "header", "header", "none", "none"]))
                notes.append(f"id via {where}")
                if where == "header" and _header_safe(sid):
                    headers["x-stateful-session"] = sid.encode("utf-8")
                elif where in ("stateful", "ark_stateful", "header") and isinstance(body, dict):
                    body = {where if where != "header" else "stateful": sid, **body}
            if shape == "oversize" and isinstance(body, dict):
                body["padding"] = "x" * (MAX_BODY_BYTES + 1024)
            if route in ("chat", "completions"):
                sid_resolved = _openai_session_id(body, headers.get("x-stateful-session"))
                _cost_guard(body, stateless=sid_resolved is None)
            if route == "flash_register":
                _cost_guard(body, stateless=False)
            if route == "create":
                _ttl_guard(body)
            text = json.dumps(body, ensure_ascii=draw(st.booleans()))
            try:
                content = text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates travel as \u escapes
                content = json.dumps(body).encode("utf-8")
    if route in ("chat", "completions"):
        resolved = _openai_session_id(body, headers.get("x-stateful-session"))
    elif route == "create":
        resolved = body.get("id") if isinstance(body, dict) else None
    elif "{id}" in ROUTES[route][1]:
        resolved = sid
    else:
        resolved = None
    if AUTHS[auth] is not None:
        headers["authorization"] = AUTHS[auth].encode()
    return Case(route, method, path, auth, headers, params, content, body, notes, resolved)


def _explicit(route: str, body: Any, sid: str | None = None, note: str = "") -> Case:
    """A fixed request (regressions the fuzz found), run before the generated ones."""
    method, path = ROUTES[route]
    if sid is not None:
        path = path.replace("{id}", quote(sid, safe=""))
    headers = {"content-type": b"application/json", "authorization": AUTHS["A"].encode()}
    if route in ("chat", "completions"):
        resolved = _openai_session_id(body, None)
    else:
        resolved = sid if "{id}" in ROUTES[route][1] else body.get("id")
    return Case(route, method, path, "A", headers, {}, json.dumps(body).encode(), body, [f"explicit: {note}"], resolved)


_HI = [{"role": "user", "content": "hi"}]
REGRESSIONS = [
    _explicit(
        "chat",
        {"stateful": VICTIM, "messages": [{"role": "user", "content": [{"type": {}, "text": "a"}]}], "max_tokens": 1},
        note="unhashable content part type",
    ),
    _explicit(
        "create", {"messages": [{"role": "user", "content": [{"type": []}]}]}, note="unhashable content part type"
    ),
    _explicit(
        "append",
        {"messages": [{"role": "user", "content": [{"type": ["x"]}]}]},
        VICTIM,
        note="unhashable content part type",
    ),
    _explicit("completions", {"stateful": VICTIM, "max_tokens": 1}, note="no prompt"),
    _explicit("completions", {"stateful": VICTIM, "prompt": "\ud800", "max_tokens": 1}, note="lone surrogate"),
    _explicit("append", {"text": "a\ud800"}, VICTIM, note="lone surrogate"),
    _explicit("completions", {"stateful": VICTIM, "prompt": "a", "max_tokens": 1, "stop": ["\ud800"]}, note="stop"),
    _explicit("chat", {"stateful": VICTIM, "messages": _HI, "max_tokens": 0}, note="max_tokens 0"),
    _explicit(
        "chat",
        {"stateful": VICTIM, "messages": _HI, "max_tokens": 1, "structured_outputs": []},
        note="structured_outputs not an object",
    ),
    _explicit(
        "completions",
        {"stateful": VICTIM, "prompt": "a", "max_tokens": 1, "logit_bias": {"x": 1}},
        note="logit_bias key",
    ),
    _explicit("completions", {"stateful": VICTIM, "prompt": "a", "max_tokens": 1, "temperature": math.nan}, note="NaN"),
    _explicit("completions", {"prompt": "a", "max_tokens": 0}, note="stateless, max_tokens 0"),
    _explicit("chat", {"messages": _HI, "max_tokens": 10**6}, note="stateless, max_tokens over the context"),
    _explicit(
        "chat",
        {"messages": [{"role": "user", "content": [{"text": "a"}]}], "max_tokens": 1},
        note="stateless, part without type",
    ),
]


# --- the run ------------------------------------------------------------------------------


def _snapshot(body: dict) -> dict:
    keys = (
        "id", "version", "context_tokens", "pinned_blocks", "state", "queued_tokens", "ttl_s", "token_ids",
        "flash_queries",
    )  # fmt: skip
    return {k: body.get(k) for k in keys}


def _sse_events(text: str) -> list[Any]:
    events = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            try:
                events.append(json.loads(line[6:]))
            except ValueError:
                events.append({"unparsable": line[:200]})
    return events


def _error_shape_ok(body: Any, plugin_answer: bool) -> bool:
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return False
    err = body["error"]
    if not {"message", "type", "param", "code"} <= set(err):
        return False
    if not isinstance(err["message"], str) or not isinstance(err["type"], str):
        return False
    return isinstance(err["code"], str) or (not plugin_answer and isinstance(err["code"], int))


@dataclass
class FuzzRun:
    root: str
    log: Path
    http: httpx.Client = field(init=False)
    victim: dict = field(default_factory=dict)
    preexisting: dict[str, frozenset] = field(default_factory=dict)
    violations: list[dict] = field(default_factory=list)
    counts: collections.Counter = field(default_factory=collections.Counter)
    statuses: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    error_codes: collections.Counter = field(default_factory=collections.Counter)
    since_integrity: int = 0
    known_fid: str = ""

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.root, timeout=TIMEOUT_S)

    # plumbing
    def call(self, method: str, path: str, tenant: str = "A", **kw) -> httpx.Response:
        headers = {"Authorization": AUTHS[tenant], **kw.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kw)

    def victim_state(self) -> dict:
        r = self.call("GET", f"/v1/sessions/{VICTIM}", params={"include_tokens": "true"})
        assert r.status_code == 200, f"the victim session is gone: {r.status_code} {r.text}"
        return _snapshot(r.json())

    def ids(self, tenant: str) -> set[str]:
        r = self.call("GET", "/v1/sessions", tenant=tenant)
        assert r.status_code == 200, r.text
        return {s["id"] for s in r.json()["data"]}

    def integrity(self) -> dict:
        r = self.call("GET", "/v1/stateful/debug/integrity")
        assert r.status_code == 200, r.text
        return r.json()

    def settle(self, deadline_s: float = 30.0) -> dict:
        """Wait until the victim has nothing queued; its state then."""
        end = time.monotonic() + deadline_s
        while True:
            state = self.victim_state()
            if not state["queued_tokens"] or time.monotonic() > end:
                return state
            time.sleep(0.02)

    def violation(self, kind: str, case: Case, resp: httpx.Response | None, **extra) -> None:
        self.counts["violations"] += 1
        record = {"kind": kind, "route": case.route, **case.describe()}
        if resp is not None:
            record["status"] = resp.status_code
            record["response"] = resp.text[:600]
        record.update(extra)
        self.violations.append(record)

    def server_exception(self) -> str:
        """The last exception line in the server log (what a 5xx was)."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-400:]
        except OSError:
            return "?"
        hits = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
        return hits[-1][:300] if hits else "?"

    # setup
    def set_up_victim(self) -> None:
        def ok(r: httpx.Response, *codes: int) -> dict:
            assert r.status_code in codes, r.text
            return r.json()

        turns = [
            [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Plan a day in Porto."}],
            [{"role": "user", "content": "Cheaper, please."}],
        ]
        for msgs in turns:
            ok(
                self.call("POST", "/v1/chat/completions", json={"stateful": VICTIM, "messages": msgs, "max_tokens": 4}),
                200,
            )
        ok(self.call("POST", f"/v1/sessions/{VICTIM}/append", json={"text": "Note: rain expected.", "wait": True}), 200)
        ok(self.call("POST", f"/v1/sessions/{VICTIM}/append", json={"token_ids": [11, 12, 13, 14], "wait": True}), 200)
        ok(
            self.call(
                "POST",
                f"/v1/sessions/{VICTIM}/append",
                json={"messages": [{"role": "user", "content": "And tomorrow?"}], "wait": True},
            ),
            200,
        )
        body = {"stateful": VICTIM, "messages": [{"role": "user", "content": "One line."}], "max_tokens": 4}
        ok(self.call("POST", "/v1/chat/completions", json=body), 200)
        question = {"name": "known", "prompt": "Summary:", "max_tokens": 3}
        self.known_fid = ok(self.call("POST", f"/v1/sessions/{VICTIM}/flash_queries", json=question), 201)["id"]
        self.victim = self.settle()
        assert self.victim["version"] == 6 and self.victim["state"] == "resident", self.victim

    # one request
    def run_case(self, case: Case) -> None:
        route = case.route
        self.counts["requests"] += 1
        self.counts[f"route:{route}"] += 1
        before_a = self.preexisting["A"] | {VICTIM}
        path = case.path.replace(KNOWN_FID, self.known_fid)
        try:
            if route == "events":  # a stream that stays open: read the status and headers, then hang up
                with self.http.stream(case.method, path, headers=case.headers) as resp:
                    if resp.status_code != 200:
                        resp.read()
            else:
                resp = self.http.request(
                    case.method,
                    path,
                    params=case.params or None,
                    headers=case.headers,
                    content=case.content,
                )
        except httpx.TimeoutException as exc:
            self.violation("timeout", case, None, error=repr(exc))
            return
        status = resp.status_code
        self.statuses[route][status] += 1
        ctype = resp.headers.get("content-type", "")
        payload: Any = None
        stream_error = None
        if route == "events":
            payload = resp.json() if status != 200 and ctype.startswith("application/json") else None
        elif ctype.startswith("text/event-stream"):
            events = _sse_events(resp.text)
            # the chunk that carries the session (the usage chunk, if any, comes after it)
            payload = next((e for e in reversed(events) if isinstance(e, dict) and "session" in e), None)
            errors = [e for e in events if isinstance(e, dict) and "error" in e]
            if errors:
                stream_error = errors[-1]
        else:
            try:
                payload = resp.json()
            except ValueError:
                payload = None

        # 1. never a server error
        if status >= 500:
            self.violation("5xx", case, resp, server_log=self.server_exception())
        if stream_error is not None:
            self.counts["stream_errors"] += 1
            err = stream_error.get("error")
            code = err.get("code") if isinstance(err, dict) else None
            self.error_codes[f"stream:{code}"] += 1
            kind = err.get("type") if isinstance(err, dict) else None
            if not _error_shape_ok(stream_error, plugin_answer=True) or kind in SERVER_ERROR_TYPES:
                self.violation("stream error event", case, resp)
        rejected = status >= 400 or stream_error is not None
        if rejected:
            self.counts["rejected"] += 1
        # 2. the error format
        if case.auth in ("bad", "none") and status != 401:
            self.violation("served without a valid API key", case, resp)
        if 400 <= status < 500:
            if status == 401 and case.auth in ("bad", "none"):
                if payload != {"error": "Unauthorized"}:
                    self.violation("401 body", case, resp)
            else:
                stateless = route in ("chat", "completions") and case.session_id is None
                if not _error_shape_ok(payload, plugin_answer=not stateless):
                    self.violation("error body format", case, resp)
                else:
                    self.error_codes[f"{status}:{payload['error']['code']}"] += 1
                if status == 401:
                    self.violation("401 with a valid key", case, resp)
        elif status < 400 and status not in (200, 201, 202):
            self.violation("unexpected status", case, resp)

        # 3. the victim: unchanged unless this request committed on it
        old = self.victim
        new = self.victim_state()
        self.counts["victim_checks"] += 1
        on_victim = case.session_id == VICTIM and case.auth == "A"
        if rejected and on_victim:
            self.counts["rejected_on_victim"] += 1
        reported = None
        if on_victim and not rejected and isinstance(payload, dict):
            if route in ("chat", "completions"):
                s = payload.get("session")
                reported = s.get("version") if isinstance(s, dict) and s.get("id") == VICTIM else None
            elif route == "append":
                reported = payload.get("version") if payload.get("id") == VICTIM else None
        if reported is not None and reported == old["version"] + 1:
            self.counts["commits_on_victim"] += 1
            new = self.settle()
            grew = new["token_ids"][: len(old["token_ids"])] == old["token_ids"]
            if new["version"] != old["version"] + 1 or not grew or new["state"] != "resident":
                self.violation(
                    "accepted change is not one clean commit", case, resp, before=_brief(old), after=_brief(new)
                )
        elif route in ("flash_register", "flash_delete") and on_victim and not rejected:
            fid = payload.get("id") if isinstance(payload, dict) else None
            rest_same = {k: v for k, v in new.items() if k != "flash_queries"} == {
                k: v for k, v in old.items() if k != "flash_queries"
            }
            listed = fid in (new["flash_queries"] or [])
            if not rest_same or listed != (route == "flash_register"):
                kind = "flash change is not exactly one query"
                self.violation(kind, case, resp, before=_brief(old), after=_brief(new))
            else:
                self.counts["accepted_on_victim_unchanged"] += 1
        elif new != old:
            self.violation(
                "victim changed" + (" by a rejected request" if rejected else ""),
                case,
                resp,
                reported_version=reported,
                before=_brief(old),
                after=_brief(new),
            )
        else:
            if on_victim and not rejected:
                self.counts["accepted_on_victim_unchanged"] += 1  # queries, reads
            elif rejected and on_victim:
                self.counts["rejected_on_victim_verified"] += 1
        self.victim = new

        # 4. sessions appear only when a request was accepted; remove them now
        for tenant in ("A", "B") if case.auth == "B" else ("A",):
            expected = before_a if tenant == "A" else self.preexisting["B"]
            now = self.ids(tenant)
            if now - expected:
                if rejected or case.auth not in ("A", "B"):
                    self.violation(
                        f"rejected request left sessions for tenant {tenant}", case, resp, left=sorted(now - expected)
                    )
                for sid in sorted(now - expected):
                    self.counts["sessions_created"] += 1
                    d = self.call("DELETE", f"/v1/sessions/{quote(sid, safe='').replace('.', '%2E')}", tenant=tenant)
                    if d.status_code != 200 or d.json().get("deleted") is not True:
                        self.violation("cleanup delete failed", case, d, session=sid)
            if expected - now:
                self.violation(f"sessions of tenant {tenant} vanished", case, resp, gone=sorted(expected - now))

        # 5. the integrity report
        self.since_integrity += 1
        if not rejected or self.since_integrity >= 20:
            self.since_integrity = 0
            report = self.integrity()
            self.counts["integrity_checks"] += 1
            if report["problems"]:
                self.violation("integrity problems", case, resp, problems=report["problems"][:5])

    def summary(self) -> dict:
        c = self.counts
        return {
            "requests": c["requests"],
            "per_route": {r: c[f"route:{r}"] for r in ROUTES},
            "statuses": {r: dict(sorted(self.statuses[r].items())) for r in ROUTES},
            "rejected": c["rejected"],
            "rejected_on_victim": c["rejected_on_victim"],
            "rejected_on_victim_verified_unchanged": c["rejected_on_victim_verified"],
            "victim_checks": c["victim_checks"],
            "commits_on_victim": c["commits_on_victim"],
            "accepted_on_victim_unchanged": c["accepted_on_victim_unchanged"],
            "stream_errors": c["stream_errors"],
            "sessions_created_and_deleted": c["sessions_created"],
            "integrity_checks": c["integrity_checks"],
            "error_codes": dict(self.error_codes.most_common()),
            "victim_final": {
                k: v for k, v in _brief(self.victim).items() if k in ("version", "n_tokens", "pinned_blocks")
            },
            "leftover_sessions": c["leftover_sessions_A"] + c["leftover_sessions_B"],
            "final_free_blocks": c["final_free_blocks"],
            "violations": c["violations"],
        }

    def distinct_violations(self) -> list[dict]:
        seen: dict[tuple, dict] = {}
        for v in self.violations:
            key = (v["kind"], v["route"], v.get("status"), v.get("server_log", "")[:60])
            if key not in seen:
                seen[key] = {**v, "occurrences": 0}
            seen[key]["occurrences"] += 1
        return list(seen.values())


def _brief(state: dict) -> dict:
    ids = state.get("token_ids") or []
    return {**{k: v for k, v in state.items() if k != "token_ids"}, "n_tokens": len(ids), "tail": ids[-8:]}


def run_fuzz(run: FuzzRun, vocab: int, max_examples: int = MAX_EXAMPLES) -> FuzzRun:
    """The whole fuzz against a running server; ``run`` collects counts and violations."""
    run.preexisting = {"A": frozenset(run.ids("A")), "B": frozenset(run.ids("B"))}
    assert VICTIM not in run.preexisting["A"], "a previous fuzz run left its victim behind"
    pre_victim = run.integrity()
    run.set_up_victim()
    baseline = _wait_idle(run)  # the victim's flash query is evaluated at registration
    assert baseline["problems"] == [], baseline
    victim0 = dict(run.victim)

    @given(case=cases(vocab, run.preexisting["A"] | run.preexisting["B"] | {VICTIM}))
    def fuzz(case: Case) -> None:
        run.run_case(case)

    for case in REGRESSIONS:
        fuzz = example(case=case)(fuzz)
    fuzz = settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=(Phase.explicit, Phase.generate),  # no shrinking: examples run against one live server
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )(fuzz)

    # no example database (database=None) and hypothesis' other caches outside the checkout
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "vllm-stateful-hypothesis")
    try:
        fuzz()
    finally:
        set_hypothesis_home_dir(None)
        _check_cleanup(run, baseline, pre_victim, victim0)
    return run


def _wait_idle(run: FuzzRun) -> dict:
    end = time.monotonic() + 15
    while True:
        report = run.integrity()
        if (report["running"] == 0 and report["waiting"] == 0) or time.monotonic() > end:
            return report
        time.sleep(0.1)


def _check_cleanup(run: FuzzRun, baseline: dict, pre_victim: dict, victim0: dict) -> None:
    for tenant in ("A", "B"):
        for sid in sorted(run.ids(tenant) - run.preexisting[tenant] - {VICTIM}):
            run.counts[f"leftover_sessions_{tenant}"] += 1
            r = run.call("DELETE", f"/v1/sessions/{quote(sid, safe='').replace('.', '%2E')}", tenant=tenant)
            assert r.status_code == 200, r.text
    victim = run.settle()
    report = _wait_idle(run)
    assert report["problems"] == [], report["problems"]
    grown = victim["pinned_blocks"] - victim0["pinned_blocks"]
    assert report["free_blocks"] == baseline["free_blocks"] - grown, (report, baseline, grown)
    # and without the victim, everything is back to what it was before the test
    r = run.call("DELETE", f"/v1/sessions/{VICTIM}")
    assert r.status_code == 200 and r.json()["freed_blocks"] == victim["pinned_blocks"], r.text
    report = _wait_idle(run)
    assert report["problems"] == [], report["problems"]
    assert report["free_blocks"] == pre_victim["free_blocks"], (report, pre_victim)
    assert report["charged_blocks"] == pre_victim["charged_blocks"], (report, pre_victim)
    assert run.ids("A") == run.preexisting["A"] and run.ids("B") == run.preexisting["B"]
    run.counts["final_free_blocks"] = report["free_blocks"]


def test_fuzz_every_route(stateful_server):
    vocab = json.loads((Path(stateful_server.model_path) / "config.json").read_text())["vocab_size"]
    started = time.monotonic()
    run = FuzzRun(stateful_server.root, stateful_server.log)
    try:
        run_fuzz(run, vocab)
    finally:  # the counts, also when the final checks fail
        print("fuzz:", json.dumps({**run.summary(), "wall_s": round(time.monotonic() - started, 1)}))
    distinct = run.distinct_violations()
    assert not distinct, f"{len(run.violations)} violations, {len(distinct)} distinct:\n" + "\n".join(
        json.dumps(v, ensure_ascii=False) for v in distinct[:20]
    )
