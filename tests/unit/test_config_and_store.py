"""Plugin config, session ids, the session store, admission and the serve argv."""

import asyncio
import json

import pytest

from vllm_stateful.config import StatefulConfig
from vllm_stateful.sessions.admission import Budget, check_growth
from vllm_stateful.sessions.ids import is_valid_session_id, new_session_id
from vllm_stateful.sessions.store import SessionError, SessionStore

pytestmark = pytest.mark.unit


def test_config_defaults_and_parsing():
    assert StatefulConfig.from_additional_config(None) == StatefulConfig()
    cfg = StatefulConfig.from_additional_config(json.dumps({"stateful": {"cell_budget": 4096, "default_ttl_s": 5}}))
    assert cfg.cell_budget == 4096 and cfg.default_ttl_s == 5 and cfg.admission == "reject"
    assert StatefulConfig.from_additional_config({"other_plugin": 1}) == StatefulConfig()


@pytest.mark.parametrize(
    "section",
    [{"cel_budget": 1}, {"admission": "evict"}, {"admission": "offload"}, {"cell_budget": -1}, {"default_ttl_s": -1}],
)
def test_config_rejects_bad_values(section):
    with pytest.raises(ValueError):
        StatefulConfig.from_additional_config({"stateful": section})


def test_session_ids():
    assert is_valid_session_id("a.b:c-d_9") and is_valid_session_id("x" * 128)
    for bad in ("", "x" * 129, "has space", "slash/", None, 5):
        assert not is_valid_session_id(bad)
    a, b = new_session_id(), new_session_id()
    assert a != b and is_valid_session_id(a) and len(a) == len("sess_") + 32


def test_store_lifecycle_and_expiry():
    async def run():
        store = SessionStore(default_ttl_s=10)
        s = store.create("s1")
        with pytest.raises(SessionError) as e:
            store.create("s1")
        assert e.value.status == 409
        with pytest.raises(SessionError) as e:
            store.get("missing")
        assert e.value.status == 404
        assert store.get_or_create("s1") is s and len(store) == 1
        s.pinned_blocks = 3
        store.create("s2", ttl_s=0).pinned_blocks = 2
        assert store.pinned_blocks() == 5
        assert [x.id for x in store.expired(now=s.last_used_at + 11)] == ["s1"]  # ttl 0 never expires
        s.turn_in_flight = True
        assert store.expired(now=s.last_used_at + 11) == []
        assert store.remove("s1").state == "closed" and "s1" not in store

    asyncio.run(run())


def test_admission_refuses_over_quota_and_budget():
    budget = Budget(cell_budget_tokens=1024, session_quota_tokens=600, block_size=32)
    check_growth(budget, pinned_blocks_total=10, session_pinned_blocks=2, session_tokens_after=500)
    with pytest.raises(SessionError) as e:
        check_growth(budget, 0, 0, 601)
    assert e.value.status == 429 and e.value.code == "session_quota_exceeded" and e.value.retry_after
    with pytest.raises(SessionError) as e:
        check_growth(budget, pinned_blocks_total=30, session_pinned_blocks=0, session_tokens_after=100)
    assert e.value.code == "cell_budget_exceeded"


def test_serve_argv_switches_plugin_on_and_keeps_user_flags(monkeypatch):
    from vllm_stateful import cli

    monkeypatch.setenv("VLLM_PLUGINS", "other")
    monkeypatch.setattr(cli, "_is_cpu_build", lambda: True)
    argv = cli.serve_argv(["/m", "--block-size", "64", "--cell-budget", "2048", "--additional-config", '{"x": 1}'])
    assert argv[:3] == ["vllm", "serve", "/m"]
    assert argv[argv.index("--scheduler-cls") + 1] == "vllm_stateful.engine.scheduler.StatefulScheduler"
    assert argv.count("--block-size") == 1 and argv[argv.index("--block-size") + 1] == "64"
    assert json.loads(argv[argv.index("--additional-config") + 1]) == {"x": 1, "stateful": {"cell_budget": 2048}}
    assert "--enforce-eager" in argv
    import os

    assert os.environ["VLLM_PLUGINS"] == "other,stateful"


def test_serve_without_model_uses_the_demo_model(monkeypatch):
    from vllm_stateful import cli, demo_model

    monkeypatch.setattr(demo_model, "ensure_demo_model", lambda size="tiny": f"/cache/{size}")
    argv = cli.serve_argv(["--port", "9000"])
    assert argv[:3] == ["vllm", "serve", "/cache/tiny"]
    assert argv[argv.index("--served-model-name") + 1] == "qwen2-tiny-demo"
    assert cli.serve_argv(["--served-model-name", "mine"]).count("--served-model-name") == 1
