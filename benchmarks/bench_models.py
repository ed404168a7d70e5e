"""Models the benchmark scripts share: a tiny random Llama, SmolLM2-135M-Instruct, Llama-3.2-1B's shape, and a tiny
Llama with Llama-3's vocabulary (where the LM head and the logits dominate)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_model(name: str, dtype: str = "fp32", device: str = "cpu", tiny_hidden: int = 64):
    """(model, tokenizer) on ``device`` in ``dtype``; random models pair with the byte-level ByT5 tokenizer."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    from gere_hf.models import load_model_and_tokenizer, tiny_llama

    if name == "tiny":
        model, tok = tiny_llama(hidden_size=tiny_hidden, num_layers=2, seed=0), ByT5Tokenizer()
    elif name == "llama-1b-shape":  # Llama-3.2-1B's shape with random weights: nothing to download
        config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                             tie_word_embeddings=True, rope_theta=500000.0, pad_token_id=0, eos_token_id=1)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        tok = ByT5Tokenizer()
    elif name == "llama3-vocab":  # Llama-3's 128,256-token vocabulary on a tiny body: logits are most of the cost
        config = LlamaConfig(vocab_size=128256, hidden_size=tiny_hidden, intermediate_size=4 * tiny_hidden,
                             num_hidden_layers=2, num_attention_heads=max(1, tiny_hidden // 32),
                             num_key_value_heads=max(1, tiny_hidden // 64), max_position_embeddings=2048,
                             tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        tok = ByT5Tokenizer()
    else:
        model, tok = load_model_and_tokenizer(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device=device, dtype=DTYPES[dtype]), tok
