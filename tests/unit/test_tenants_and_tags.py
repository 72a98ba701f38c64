"""Tenant resolution, cache salts, signed engine tags and the startup gate (pure)."""

import pytest

from vllm_stateful.engine.request_tags import PrefixRef, make_extra_args, read_tag, reserved_keys, with_prefix
from vllm_stateful.engine.support import KVGroupShape, unsupported_reason
from vllm_stateful.sessions.store import SessionError
from vllm_stateful.sessions.tenants import DEFAULT_TENANT, Tenancy

pytestmark = pytest.mark.unit


def test_without_keys_there_is_one_tenant():
    t = Tenancy.from_settings(None, None)
    assert t.tenant_of({}) == DEFAULT_TENANT and not t.multi_tenant


def test_each_api_key_is_a_tenant_and_keys_are_not_kept():
    t = Tenancy.from_settings(["key-a", "key-b"], None)
    a = t.tenant_of({"authorization": "Bearer key-a"})
    b = t.tenant_of({"authorization": "bearer key-b"})
    assert a != b and "key-a" not in a and t.multi_tenant
    assert t.tenant_of({"authorization": "Bearer key-a"}) == a  # stable
    for bad in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic key-a"}):
        with pytest.raises(SessionError) as e:
            t.tenant_of(bad)
        assert e.value.status == 401


def test_gateway_header_names_the_tenant_within_the_key():
    t = Tenancy.from_settings(["k"], "X-Tenant")
    assert t.tenant_of({"authorization": "Bearer k", "x-tenant": "acme"}).endswith("/acme")
    for bad in ({"authorization": "Bearer k"}, {"authorization": "Bearer k", "x-tenant": "a b"}):
        with pytest.raises(SessionError) as e:
            t.tenant_of(bad)
        assert e.value.status == 400
    assert Tenancy.from_settings(None, "x-tenant").tenant_of({"x-tenant": "acme"}) == "acme"


def test_salts_separate_tenants_and_cannot_be_guessed_from_the_name():
    t1, t2 = Tenancy.from_settings(["a"], None), Tenancy.from_settings(["a"], None)
    assert t1.salt("x") != t1.salt("y")
    assert t1.salt("x") != t2.salt("x")  # per-process secret
    assert t1.salt("x", "client-salt") != t1.salt("x")
    assert len(t1.salt("x")) <= 128 and "/" not in t1.salt("x")


def test_only_tags_signed_with_the_secret_are_honoured():
    secret = b"s" * 32
    args = make_extra_args(secret, "key1", True)
    tag, forged = read_tag(args, secret)
    assert tag is not None and tag.key == "key1" and tag.commit and not forged
    assert read_tag(None, secret) == (None, False)
    assert read_tag({"other": 1}, secret) == (None, False)
    forged_args = [
        {"stateful_session": "victim"},  # the attack from the issue: no MAC at all
        {"stateful_session": "victim", "stateful_commit": True, "stateful_mac": "00" * 32},
        {**args, "stateful_session": "key2"},  # a valid MAC for another key
        {**args, "stateful_commit": False},  # a valid MAC for the other commit flag
        {**args, "stateful_commit": 1},
    ]
    for bad in forged_args:
        assert read_tag(bad, secret) == (None, True), bad
    assert read_tag(args, None) == (None, True)  # before the handshake nothing verifies
    assert read_tag(args, b"t" * 32) == (None, True)
    assert reserved_keys({"stateful_session": 1, "mine": 2, "stateful_x": 3}) == ["stateful_session", "stateful_x"]


def test_a_prefix_reference_is_under_the_mac():
    secret = b"s" * 32
    plain = make_extra_args(secret, "key1", False)
    args = with_prefix({**plain, "other": 1}, secret, PrefixRef(generation=4, tokens=4096))
    tag, forged = read_tag(args, secret)
    assert tag is not None and not forged and tag.prefix == PrefixRef(4, 4096) and not tag.commit
    assert args["other"] == 1 and read_tag(plain, secret)[0].prefix is None
    tampered = [
        {**args, "stateful_ref": [4, 4095]},  # another length under the same MAC
        {**args, "stateful_ref": [3, 4096]},  # another generation
        {**plain, "stateful_ref": [4, 4096]},  # a reference added to a tag signed without one
        {**args, "stateful_ref": [4, 0]},
        {**args, "stateful_ref": [-1, 4096]},
        {**args, "stateful_ref": [4, 4096.0]},
        {**args, "stateful_ref": [4, True]},
        {**args, "stateful_ref": "4,4096"},
        {**args, "stateful_ref": [4, 4096, 1]},
    ]
    for bad in tampered:
        assert read_tag(bad, secret) == (None, True), bad


def test_startup_gate_names_what_is_supported():
    full = [KVGroupShape("FullAttentionSpec")]
    assert unsupported_reason(full, True) is None
    refused = {
        "hybrid": ([KVGroupShape("FullAttentionSpec"), KVGroupShape("MambaSpec")], True, 1),
        "sliding": ([KVGroupShape("SlidingWindowSpec", sliding_window=128)], True, 1),
        "sliding-in-full": ([KVGroupShape("FullAttentionSpec", sliding_window=128)], True, 1),
        "chunked": ([KVGroupShape("ChunkedLocalAttentionSpec", attention_chunk_size=64)], True, 1),
        "mamba": ([KVGroupShape("MambaSpec")], True, 1),
        "no-apc": (full, False, 1),
        "api-servers": (full, True, 2),
    }
    for name, (groups, apc, api) in refused.items():
        reason = unsupported_reason(groups, apc, api)
        assert reason and reason.startswith("vllm-stateful supports full-attention models"), name
