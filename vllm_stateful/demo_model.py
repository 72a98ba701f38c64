"""Build small random-weight models of a real architecture (Qwen2), offline.

The model directory is a normal Hugging Face checkpoint (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` with a
ChatML template, ``generation_config.json``), so vLLM loads it through its
ordinary loader. The tokenizer is a byte-level BPE trained here on an
embedded corpus; nothing is downloaded. Given the same size the output is
byte-for-byte reproducible (fixed seeds, fixed corpus).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    """Transformer body shape; ``dtype`` is what the weights are saved in."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    dtype: str
    initializer_range: float


SHAPES: dict[str, ModelShape] = {
    # A few M params: fast enough for the whole e2e suite on 2 CPU cores.
    # float32 and a wide init keep greedy argmax far from ties, so
    # session-vs-stateless equality is not at the mercy of kernel rounding.
    "tiny": ModelShape(256, 2, 4, 2, 512, 4096, "float32", 0.2),
    # Qwen2.5-0.5B body (hidden 896, 24 layers, 14 heads, 2 KV heads).
    "small": ModelShape(896, 24, 14, 2, 4864, 4096, "bfloat16", 0.02),
}

_WORDS = (
    "the a an of to and in is it that for on with as was at by from be this have or are not but what all "
    "were when we there can your which their said if do will each about how up out them then she many some "
    "so these would other into has more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after words called just where "
    "most know get through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place well such here "
    "take why things help put years different away again off went old number great tell men say small every "
    "found still between name should home big give air line set own under read last never us left end along "
    "while might next sound below saw something thought both few those always show large often together asked "
    "house world going want school important until form food keep children feet land side without boy once "
    "animals life enough took sometimes four head above kind began almost live page got earth need far hand "
    "high year mother light parts country father let night following picture being study second eyes soon "
    "times story boys since white days ever paper hard near sentence better best across during today others "
    "however sure means knew try told young miles sun ways thing whole hear example heard several change "
    "answer room sea against top turned learn point city play toward five using himself usually money price "
    "market stock trade buy sell trend volume ticker session cache token model query data stream append plan "
    "travel car band fitness python budget engine server request answer question user assistant system"
).split()


def _corpus() -> list[str]:
    """A deterministic English-like corpus (word salad plus digits and code)."""
    import random

    rng = random.Random(1234)
    lines = []
    for _ in range(4000):
        n = rng.randint(4, 18)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, n), f"{rng.randint(0, 99999)}.{rng.randint(0, 99)}")
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ":", ","]))
    lines += [
        "def main():\n    print('hello world')\n",
        "for i in range(10):\n    total += i\n",
        "BTC 64123.55 ETH 3120.10 SOL 145.20 +1.2% -0.8%\n",
    ]
    return lines


def corpus_text() -> str:
    """The demo tokenizer's training text (deterministic): ordinary text for benchmarks."""
    return " ".join(_corpus())


def corpus_token_ids(model_path: str | os.PathLike) -> list[int]:
    """``corpus_text`` tokenized by the tokenizer in ``model_path`` (no special tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path)).encode(corpus_text(), add_special_tokens=False)


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE tokenizer (deterministic) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_demo_model(path: str | os.PathLike, size: str = "tiny", seed: int = 0, dtype: str | None = None) -> Path:
    """Write a Qwen2 checkpoint of ``size`` to ``path`` (weights in ``dtype``, default the shape's) and
    return the path. Raises ValueError for an unknown size. Overwrites files in ``path``.
    """
    if size not in SHAPES:
        raise ValueError(f"unknown demo model size {size!r}; choose from {sorted(SHAPES)}")
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    shape = SHAPES[size]
    dtype = dtype or shape.dtype
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.vocab_size)
    vocab = len(tokenizer)
    padded_vocab = (vocab + 63) // 64 * 64
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=padded_vocab,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        initializer_range=shape.initializer_range,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False).save_pretrained(
        out
    )
    (out / "stateful_demo.json").write_text(
        json.dumps({"size": size, "seed": seed, "dtype": dtype, "params": model.num_parameters()}, indent=2)
    )
    return out


def serving_dtype(size: str) -> str:
    """The dtype a demo model is written (and served) in: the shape's, except that a bfloat16 shape is
    written in float32 on a CPU without native bfloat16 (see ``cpu_dtype``), where bf16 is ~5x slower."""
    from vllm_stateful.cpu_dtype import choose_cpu_dtype, cpu_flags, is_cpu_build

    shape = SHAPES[size]
    if shape.dtype == "bfloat16" and is_cpu_build():
        return choose_cpu_dtype(cpu_flags())[0]
    return shape.dtype


def default_model_dir(size: str = "tiny", dtype: str | None = None) -> Path:
    """Where ``serve`` caches the demo model: ``$XDG_CACHE_HOME/vllm-stateful``."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    suffix = "" if dtype in (None, SHAPES[size].dtype) else f"-{dtype}"
    return base / "vllm-stateful" / "models" / f"qwen2-{size}-demo{suffix}"


def ensure_demo_model(size: str = "tiny") -> Path:
    """Return the cached demo model directory (in ``serving_dtype(size)``), building it on first use."""
    dtype = serving_dtype(size)
    out = default_model_dir(size, dtype)
    if not (out / "stateful_demo.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build_demo_model(tmp, size, dtype=dtype)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    return out
