"""Preemption under KV pressure never touches a session's pinned KV."""

from __future__ import annotations

import concurrent.futures
import random
import re

import httpx
import pytest

from tests.e2e.conftest import KEY_A, NUM_KV_BLOCKS, wait_until

pytestmark = pytest.mark.e2e


def _preemptions(server) -> float:
    text = server.get("/metrics").text
    return sum(float(v) for v in re.findall(r"^vllm:num_preemptions_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def test_burst_that_preempts_leaves_pinned_sessions_intact(stateful_server, client):
    rng = random.Random(3)
    sid = "preempt-1"
    client.completions.create(
        model="tiny",
        prompt=[rng.randrange(10, 3000) for _ in range(600)],
        max_tokens=4,
        temperature=0,
        extra_body={"stateful": sid},
    )
    before = stateful_server.get(f"/v1/sessions/{sid}", params={"include_tokens": "true"}).json()
    expected = (
        client.completions.create(  # read-only query while the pinned KV is certainly intact
            model="tiny",
            prompt=[11, 12, 13],
            max_tokens=6,
            temperature=0,
            extra_body={"stateful": sid, "stateful_commit": False, "return_token_ids": True},
        )
        .choices[0]
        .model_extra["token_ids"]
    )
    preempted_before = _preemptions(stateful_server)
    # 16 x (900 + 600) tokens = 24k > the 20k-token pool: vLLM must preempt running requests
    burst = [[rng.randrange(10, 3000) for _ in range(900)] for _ in range(16)]
    assert 16 * 1500 > NUM_KV_BLOCKS * 32

    def stateless(prompt):
        r = httpx.post(
            stateful_server.base_url + "/completions",
            timeout=300,
            headers={"Authorization": f"Bearer {KEY_A}"},
            json={"model": "tiny", "prompt": prompt, "max_tokens": 600, "ignore_eos": True, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        # all 16 admitted while vLLM is paused, so they run together however fast the machine is
        with stateful_server.paused():
            futures = [pool.submit(stateless, prompt) for prompt in burst]
            wait_until(lambda: stateful_server.integrity()["waiting"] == 16, what="the burst admitted")
        assert [f.result() for f in futures] == [600] * 16
    assert _preemptions(stateful_server) > preempted_before, "the burst did not cause preemption"
    after = stateful_server.get(f"/v1/sessions/{sid}", params={"include_tokens": "true"}).json()
    assert after["token_ids"] == before["token_ids"] and after["pinned_blocks"] == before["pinned_blocks"]
    stateful_server.integrity()
    # the pinned KV is intact: the next turn reuses all of it and answers as before the burst
    r = client.completions.create(
        model="tiny",
        prompt=[11, 12, 13],
        max_tokens=6,
        temperature=0,
        extra_body={"stateful": sid, "return_token_ids": True},
    )
    assert r.model_extra["session"]["recomputed_tokens"] == 0
    assert r.usage.prompt_tokens_details.cached_tokens == len(before["token_ids"]) - 1
    assert r.choices[0].model_extra["token_ids"] == expected
    stateful_server.delete(f"/v1/sessions/{sid}")
