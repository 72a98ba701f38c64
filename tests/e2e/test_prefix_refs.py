"""Session requests send only the tokens after the engine's pinned prefix (engine/prefix_refs.py):
the answers stay those of a stock engine over the whole prompt, the engine counts the tokens it
spliced in, and a reference the engine can no longer resolve is resent whole, still correct."""

import random

import httpx
import pytest

from tests.e2e.conftest import wait_until

pytestmark = pytest.mark.e2e


def _counters(server) -> dict:
    return server.integrity()["counters"]


def _primes_alone(tokenizer, tail: list[int]) -> bool:
    """The API server's condition for referencing (``detokenizer_prime.primes_alone``), decoded apart."""
    text = tokenizer._tokenizer.decode(tail, True)
    return bool(text) and not text.endswith("\ufffd")


def test_turns_and_queries_reference_the_pin_and_answer_as_the_whole_prompt(stateful_server, reference, tokenizer):
    server = stateful_server
    sid = "prefix-ref"
    rng = random.Random(11)
    history = server.fresh_session(sid, 1200, seed=11)
    before = _counters(server)
    referenced, prompts = 0, []
    for turn in range(4):
        new = [rng.randrange(10, 3000) for _ in range(12)]
        commit = turn % 2 == 0
        r = server.complete(sid, new, max_tokens=6, commit=commit)
        assert r.status_code == 200, r.text
        body = r.json()
        prompt = history + new
        prompts.append(prompt)
        assert body["choices"][0]["token_ids"] == reference.greedy(prompt, 6), turn
        assert body["session"]["recomputed_tokens"] == 0 and body["session"]["context_tokens"] == len(prompt)
        if _primes_alone(tokenizer, prompt[-32:]):
            referenced += len(prompt) - 32  # all but the 32 tokens the detokenizer is primed with
        if commit:
            history = server.session(sid, tokens=True)["token_ids"]
            assert history[: len(prompt)] == prompt
    # a penalty reads the whole prompt in the worker (the cached prefix too), so this answer checks
    # the spliced prompt the worker holds, not only the tokens it computes
    while not _primes_alone(tokenizer, (history + (new := [rng.randrange(10, 3000) for _ in range(12)]))[-32:]):
        pass
    prompt = history + new
    body = {"model": "tiny", "prompt": new, "max_tokens": 6, "temperature": 0, "stateful": sid,
            "stateful_commit": False, "return_token_ids": True, "repetition_penalty": 1.5}  # fmt: skip
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == reference.greedy(prompt, 6, repetition_penalty=1.5)
    assert reference.greedy(prompt, 6, repetition_penalty=1.5) != reference.greedy(prompt, 6)  # it matters here
    prompts.append(prompt)
    referenced += len(prompt) - 32
    after = _counters(server)
    assert referenced > 0
    assert after.get("referenced_tokens", 0) - before.get("referenced_tokens", 0) == referenced
    assert after.get("unresolved_references", 0) == before.get("unresolved_references", 0)
    # each spliced prompt reached the model-runner worker as one int32 buffer (the answers above are
    # the reference engine's: the worker read the same tokens from it)
    arrays = after.get("prompts_sent_as_arrays", 0) - before.get("prompts_sent_as_arrays", 0)
    assert arrays == sum(_primes_alone(tokenizer, p[-32:]) for p in prompts) and arrays > 0
    server.integrity()
    assert server.delete(f"/v1/sessions/{sid}").status_code == 200


def test_a_reference_to_a_dropped_pin_is_resent_whole(stateful_server, reference):
    """A prefix-cache reset drops every pin; until the API server notices (it polls once a second),
    its requests still reference them, and the engine refuses: each is resent with its whole prompt."""
    server = stateful_server
    sid = "prefix-ref-dropped"
    history = server.fresh_session(sid, 600, seed=12)
    refused = 0
    for attempt in range(20):  # each one races the API server's once-a-second poll
        before = _counters(server)
        assert server.complete(sid, [21, 22], max_tokens=2).status_code == 200  # pinned again, synced
        history = server.session(sid, tokens=True)["token_ids"]
        assert httpx.post(server.root + "/reset_prefix_cache", timeout=60).status_code == 200
        r = server.complete(sid, [31, 32, 33], max_tokens=4, commit=False)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == reference.greedy(history + [31, 32, 33], 4), attempt
        refused += _counters(server).get("unresolved_references", 0) - before.get("unresolved_references", 0)
        wait_until(lambda: server.session(sid)["state"] == "cold", what="session marked cold")
        if refused >= 2:
            break
    assert refused >= 2, "the API server noticed every reset before its next request"
    server.integrity()
    assert server.delete(f"/v1/sessions/{sid}").status_code == 200


def test_a_forged_reference_never_runs_and_never_splices(stateful_server):
    """/invocations is vLLM's and outside --api-key: a request carrying a prefix reference under a
    MAC that does not verify is finished unrun (its prompt leaves out a prefix it cannot have)."""
    server = stateful_server
    sid = "prefix-ref-victim"
    server.fresh_session(sid, 400, seed=13)
    before = server.session(sid, tokens=True)
    forged = server.metric('vllm_stateful:engine_events{event="forged_tags"}')
    xargs = {"stateful_session": sid, "stateful_commit": False, "stateful_ref": [1, 300], "stateful_mac": "00" * 32}
    body = {"model": "tiny", "prompt": [9] * 40, "max_tokens": 4, "temperature": 0, "vllm_xargs": xargs}
    r = httpx.post(server.root + "/invocations", json=body, timeout=60)
    if r.status_code == 200:  # vLLM answers a request its engine failed with finish_reason "error"
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "error" and choice["text"] == "", r.text
    else:
        assert r.status_code >= 400, r.text
    after = server.session(sid, tokens=True)
    assert (after["token_ids"], after["pinned_blocks"]) == (before["token_ids"], before["pinned_blocks"])
    wait_until(
        lambda: server.metric('vllm_stateful:engine_events{event="forged_tags"}') >= forged + 1,
        what="forged tag counted",
    )
    server.idle()
    assert server.delete(f"/v1/sessions/{sid}").status_code == 200
