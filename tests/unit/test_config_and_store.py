"""Plugin config, session ids, the session store, admission and the serve argv."""

import asyncio
import json

import pytest

from vllm_stateful.config import StatefulConfig
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
    [
        {"cel_budget": 1},
        {"admission": "evict"},
        {"restore": "later"},
        {"rewind_window": 0},
        {"state_dir": ""},
        {"cell_budget": -1},
        {"cell_budget": True},
        {"default_ttl_s": -1},
        {"default_ttl_s": float("inf")},
        {"default_ttl_s": 10**6},  # above max_ttl_s
        {"min_ttl_s": 0},
        {"max_request_body_bytes": 10},
        {"max_sessions": 0},
        {"ingest_wait_timeout_s": 0},
        {"tenant_header": ""},
        {"debug_routes": "yes"},
        {"ingest_yield_steps": -1},
        {"ingest_step_tokens": -1},
        {"ingest_step_tokens": 1.5},
        {"ingest_step_tokens": True},
        {"ingest_step_target_ms": -1},
        {"ingest_step_target_ms": 0.5},
        {"ingest_step_target_ms": 600_001},
    ],
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
    assert not is_valid_session_id("abc\n") and not is_valid_session_id("abc\n\n")


def test_store_lifecycle_and_expiry():
    async def run():
        store = SessionStore(default_ttl_s=10)
        s = store.create("t1", "s1")
        with pytest.raises(SessionError) as e:
            store.create("t1", "s1")
        assert e.value.status == 409
        with pytest.raises(SessionError) as e:
            store.get("t1", "missing")
        assert e.value.status == 404
        assert store.get("t1", "s1") is s and len(store) == 1
        store.create("t1", "s2", ttl_s=0)
        assert [x.id for x in store.expired(now=s.last_used_at + 11)] == ["s1"]  # ttl 0 never expires
        s.turn_in_flight = True
        assert store.expired(now=s.last_used_at + 11) == []
        s.turn_in_flight = False
        s.active_request_ids.add("a-running-query")  # running work counts as use
        assert store.expired(now=s.last_used_at + 11) == []
        s.active_request_ids.clear()
        async with s.write_lock:  # a create filling it (tokenizing, admitting) is use too
            assert store.expired(now=s.last_used_at + 11) == []
        assert [x.id for x in store.expired(now=s.last_used_at + 11)] == ["s1"]
        assert store.remove(s) and s.state == "closed" and not store.contains("t1", "s1")

    asyncio.run(run())


def test_store_scopes_ids_to_tenants_and_keeps_incarnations_apart():
    async def run():
        store = SessionStore(default_ttl_s=10, max_sessions=3, max_per_tenant=2)
        a = store.create("tenant-a", "x")
        b = store.create("tenant-b", "x")  # the same id, another tenant: another session
        assert a is not b and a.key != b.key
        with pytest.raises(SessionError) as e:
            store.get("tenant-b", "nope")
        assert e.value.status == 404
        assert [s.id for s in store.of_tenant("tenant-a")] == ["x"]
        store.create("tenant-a", "y")
        with pytest.raises(SessionError) as e:
            store.create("tenant-a", "z")  # per-tenant limit
        assert e.value.status == 429 and e.value.code == "too_many_sessions"
        with pytest.raises(SessionError) as e:
            store.create("tenant-c", "z")  # global limit
        assert e.value.status == 429
        # id reuse: removing an old incarnation never removes the new one
        assert store.remove(a)
        again = store.create("tenant-a", "x")
        assert again.key != a.key
        assert not store.remove(a)  # already gone: a late close of the old one is a no-op
        assert store.get("tenant-a", "x") is again

    asyncio.run(run())


def test_serve_argv_switches_plugin_on_and_keeps_user_flags(monkeypatch):
    from vllm_stateful import cli

    monkeypatch.setenv("VLLM_PLUGINS", "other")
    monkeypatch.setattr(cli, "is_cpu_build", lambda: True)
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
    monkeypatch.setattr(cli, "is_cpu_build", lambda: True)
    monkeypatch.setattr(cli, "cpu_flags", lambda: {"avx512_bf16"})
    argv = cli.serve_argv([])
    assert argv[argv.index("--dtype") + 1] == "float32"  # the demo model's own dtype, whatever the CPU


def test_the_small_demo_model_is_written_in_the_dtype_it_is_served_in(monkeypatch):
    from vllm_stateful import cpu_dtype, demo_model

    monkeypatch.setattr(cpu_dtype, "is_cpu_build", lambda: True)
    monkeypatch.setattr(cpu_dtype, "cpu_flags", lambda: {"avx2"})
    assert demo_model.serving_dtype("small") == "float32" and demo_model.serving_dtype("tiny") == "float32"
    assert demo_model.default_model_dir("small", "float32").name == "qwen2-small-demo-float32"
    monkeypatch.setattr(cpu_dtype, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert demo_model.serving_dtype("small") == "bfloat16"
    assert demo_model.default_model_dir("small", "bfloat16").name == "qwen2-small-demo"


@pytest.mark.parametrize("flags", [["--api-server-count=3"], ["-asc", "2"], ["--data-parallel-size", "2", "-asc", "2"]])
def test_serve_refuses_several_api_servers_before_starting(flags):
    from vllm_stateful import cli

    with pytest.raises(SystemExit) as e:
        cli.serve_argv(["/m", *flags])
    assert "--api-server-count 1" in str(e.value)
    cli.refuse_unsupported(["--api-server-count", "1", "--data-parallel-size", "4"])  # ranks are fine


def test_serve_with_data_parallel_ranks_keeps_one_api_server_and_binds_cores_per_rank(monkeypatch):
    from vllm_stateful import cli

    monkeypatch.setattr(cli, "is_cpu_build", lambda: True)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(cli, "usable_cores", lambda: [0, 1])
    argv = cli.serve_argv(["/m", "--data-parallel-size", "2"])
    assert argv[argv.index("--api-server-count") + 1] == "1"
    assert cli.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert cli.cpu_binding(2, list(range(8)), None) == "0-3|4-7"
    assert cli.cpu_binding(2, [2, 3, 6, 7], None) == "2-3|6-7"  # a cpuset: only the cores it allows
    assert cli.cpu_binding(1, [0, 1, 3], None) == "0-1,3"
    assert cli.cpu_binding(2, list(range(8)), "0-1|2-3") == "0-1|2-3"
    for bad_dp, cores, given in ((3, [0, 1], None), (2, [0, 1], "0-1")):
        with pytest.raises(SystemExit):
            cli.cpu_binding(bad_dp, cores, given)
