"""The demo model through vLLM's normal loader, and vLLM untouched when the
plugin is installed but not switched on. Runs one in-process stock engine."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stock_llm(reference):
    """The run's reference engine: stock vLLM with the plugin installed but not switched on."""
    return reference.llm


def _engine_core(llm):
    return llm.llm_engine.engine_core.engine_core


def test_installed_but_not_switched_on_runs_stock_scheduler(stock_llm):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_stateful.engine.scheduler import StatefulSchedulerMixin
    from vllm_stateful.plugin import StatefulNotEnabled

    core = _engine_core(stock_llm)
    assert type(core.scheduler) in (Scheduler, AsyncScheduler)
    assert not isinstance(core.scheduler, StatefulSchedulerMixin)
    # the general plugin was loaded (entry point installed), yet it is inert
    with pytest.raises(StatefulNotEnabled):
        core.stateful_call("info")


def test_demo_model_generates_deterministically_and_matches_transformers(stock_llm, tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Plan a trip to Rome"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok.encode(prompt)
    params = SamplingParams(max_tokens=8, temperature=0)
    first = stock_llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0].token_ids
    second = stock_llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert list(first) == list(second) and len(first) == 8

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out[0, len(ids) :].tolist() == list(first)


def test_demo_model_files(tiny_model_path):
    import json
    from pathlib import Path

    root = Path(tiny_model_path)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (root / name).exists(), name
    config = json.loads((root / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False
    )
