"""Models the benchmark scripts share: a tiny random Llama, SmolLM2-135M-Instruct, Llama-3.2-1B's shape, and a tiny
Llama with Llama-3's vocabulary (where the LM head and the logits dominate).

The random models read bytes: the tiny one pairs with ByT5's tokenizer (384 ids), the Llama-3-vocabulary ones with
:func:`wide_byte_tokenizer`, which gives the same ids for text and a name to every id up to 128,256, so that what a
random model generates can be decoded (ByT5's tokenizer fails on an id past its 384)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def wide_byte_tokenizer(vocab_size: int):
    """ByT5's ids for text (pad 0, eos 1, unk 2, byte b → b + 3, eos appended) as a fast tokenizer whose vocabulary
    names every id below ``vocab_size`` (ids past the bytes decode as ``<xN>``); saved and loaded like any other."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of = dict(zip(printable, map(chr, printable)))
    extra = iter(range(256, 512))
    char_of.update({b: chr(next(extra)) for b in range(256) if b not in char_of})  # the byte-level alphabet (GPT-2)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {char_of[b]: b + 3 for b in range(256)}
    vocab |= {f"<x{i}>": i for i in range(259, vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


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
        tok = wide_byte_tokenizer(config.vocab_size)
    elif name == "llama3-vocab":  # Llama-3's 128,256-token vocabulary on a tiny body: logits are most of the cost
        config = LlamaConfig(vocab_size=128256, hidden_size=tiny_hidden, intermediate_size=4 * tiny_hidden,
                             num_hidden_layers=2, num_attention_heads=max(1, tiny_hidden // 32),
                             num_key_value_heads=max(1, tiny_hidden // 64), max_position_embeddings=2048,
                             tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        tok = wide_byte_tokenizer(config.vocab_size)
    else:
        model, tok = load_model_and_tokenizer(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device=device, dtype=DTYPES[dtype]), tok
