# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark of the evaluator: task scoring, generation, MMLU-style letter scoring and general NLL against a bare
batched no-grad forward over the same tokens, with the memory the logits take.

    python benchmarks/bench_eval.py --model smollm2-135m --num-examples 16 --json benchmarks/results/eval_smollm2.json
    python benchmarks/bench_eval.py --model llama3-vocab --num-examples 16 --json benchmarks/results/eval_llama3v.json
    python benchmarks/bench_eval.py --model llama-1b-shape --device cuda --dtype bf16 --json "$OUT/eval.json"

What is measured (each row's tokens are the same for its bare forward and its scoring)
  choice scoring   the built-in closed tasks' eval examples (polarity: 2 choices, wiki_topic: 5), every candidate as
                   TRL's prompt + completion + eos sequence. tokens = the sum of those sequences' lengths (what lm-eval
                   style scoring forwards). Rows:
                     bare forward     the sequences in the plain path's batches (whole examples, <= --batch-size
                                      sequences, longest first, right-padded), no_grad, all logits: the target's limit;
                     bare, 1 logit    the same with logits_to_keep=1: the transformer body alone (a tighter limit);
                     plain scoring    gere_hf's choice_logprobs(shared_prompt=False): one sequence per candidate,
                                      logits only at the scored positions;
                     shared prompt    choice_logprobs (default): one forward of each prompt, the candidates continued
                                      from its KV cache. Target: >= 0.8x the bare forward's tokens/s.
  generation       greedy generation (gere_hf's left-padded batched generate, --max-new-tokens, stopping at eos or a
                   newline) of the polarity prompts; tokens = prompt + generated tokens, against a bare forward of the
                   finished sequences. Decoding is sequential: no target.
  MMLU letters     gere_hf.evaluation.mmlu's letter scoring when that module is there (see _real_mmlu); otherwise a
                   stand-in: MMLU-shaped prompts (a wiki text as the question, four options, "Answer:"), one left-padded
                   forward per batch of questions with logits_to_keep=1, the logits of " A".." D" read off; also the
                   letters as four choices through choice_logprobs. Target: one forward per question.
  general NLL      gere_hf's general_perplexity over wiki texts (the LM head run a few positions at a time) against a
                   bare forward of the same batches with all logits, and against what it did before (all logits, one
                   float32 copy, one cross-entropy). Its log-softmax over the vocabulary is work the bare forward
                   does not do: with a tiny body and a large vocabulary that alone is a forward's cost.

Memory: on CUDA, torch.cuda.max_memory_allocated during each row above what was allocated before it. On CPU the
allocator keeps no such count (and tracemalloc does not see torch's buffers): the "logits" column is the largest
tensor the LM head returned during the row (a hook on get_output_embeddings), i.e. the logits buffer; on a float32
model the float32 upcast of the scored rows is no copy, on bf16 it adds that many rows in float32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import torch

from gere_hf.evaluation import choice_logprobs, general_perplexity, load_builtin_task
from gere_hf.evaluation.scoring import _generate_hf, prompt_context_ids, tokenize_prompt_completion
from gere_hf.evaluation.utils import pad_token_id, tokenize_text
from gere_hf.replay import load_replay_texts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import bench_model  # noqa: E402

LETTERS = (" A", " B", " C", " D")


class _Meter:
    """Wall time, CPU time, the largest LM-head output (bytes) and, on CUDA, the peak memory above the start."""

    def __init__(self, model, device: str):
        self.model, self.device = model, device
        self.head = model.get_output_embeddings()

    def __enter__(self):
        self.largest_logits = 0

        def record(module, args, out):
            self.largest_logits = max(self.largest_logits, out.numel() * out.element_size())

        self.handle = self.head.register_forward_hook(record)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_memory = torch.cuda.memory_allocated()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.handle.remove()
        self.peak_memory = (torch.cuda.max_memory_allocated() - self.base_memory
                            if self.device.startswith("cuda") else None)


def _pad(seqs: list[list[int]], pad_id: int, left: bool = False):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[r, cols] = torch.tensor(s, dtype=torch.long)
        mask[r, cols] = 1
    return ids, mask


def bare_forward(model, batches: list[list[list[int]]], pad_id: int, logits_to_keep: int = 0) -> None:
    device = next(model.parameters()).device
    with torch.no_grad():
        for seqs in batches:
            ids, mask = _pad(seqs, pad_id)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                  logits_to_keep=logits_to_keep)


def choice_batches(encoded: list[list[list[int]]], batch_size: int) -> list[list[list[int]]]:
    """The plain scoring path's batches: whole examples, at most batch_size sequences, longest example first."""
    order = sorted(range(len(encoded)), key=lambda i: -max(len(s) for s in encoded[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches and sum(len(encoded[j]) for j in batches[-1]) + len(encoded[i]) <= batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    return [[s for i in b for s in encoded[i]] for b in batches]


def _row(name: str, tokens: int, meters: list[_Meter], limit: dict | None = None, **extra) -> dict:
    best = min(meters, key=lambda m: m.wall)
    row = {"name": name, "tokens": tokens, "seconds_runs": [round(m.wall, 3) for m in meters],
           "cpu_seconds_runs": [round(m.cpu, 3) for m in meters], "seconds": best.wall,
           "tokens_per_second": tokens / best.wall, "largest_logits_bytes": max(m.largest_logits for m in meters),
           "peak_memory_bytes": None if best.peak_memory is None else max(m.peak_memory for m in meters), **extra}
    if limit is not None:
        row["ratio_to_bare"] = row["tokens_per_second"] / limit["tokens_per_second"]
        row["ratio_to_bare_cpu"] = min(limit["cpu_seconds_runs"]) / min(row["cpu_seconds_runs"])
    return row


def bench_choices(model, tok, args) -> list[dict]:
    prompts, choices = [], []
    for name in args.tasks:
        task = load_builtin_task(name, 0, args.num_examples, seed=args.seed)
        prompts += list(task.eval["prompt"])
        choices += [task.choices] * len(task.eval)
    encoded = [[tokenize_prompt_completion(tok, p, c)[0] for c in cands] for p, cands in zip(prompts, choices)]
    tokens = sum(len(s) for row in encoded for s in row)
    batches = choice_batches(encoded, args.batch_size)
    pad_id = pad_token_id(tok)
    runs = {k: [] for k in ("bare", "bare1", "plain", "shared")}
    model.eval()
    for _ in range(args.repeats):  # interleaved: a slow phase of a shared machine hits every row alike
        for key in runs:
            with _Meter(model, args.device) as m:
                if key == "bare":
                    bare_forward(model, batches, pad_id)
                elif key == "bare1":
                    bare_forward(model, batches, pad_id, logits_to_keep=1)
                else:
                    choice_logprobs(model, tok, prompts, choices, args.batch_size, progress=False,
                                    shared_prompt=key == "shared")
            runs[key].append(m)
    bare = _row("choices: bare forward (all logits)", tokens, runs["bare"])
    extra = {"examples": len(prompts), "sequences": sum(len(c) for c in choices), "tasks": list(args.tasks)}
    return [{**bare, **extra},
            {**_row("choices: bare forward, logits_to_keep=1", tokens, runs["bare1"], bare), **extra},
            {**_row("choices: plain scoring (one sequence per candidate)", tokens, runs["plain"], bare), **extra},
            {**_row("choices: shared prompt (gere_hf default)", tokens, runs["shared"], bare), **extra}]


def bench_generation(model, tok, args) -> list[dict]:
    task = load_builtin_task("polarity", 0, args.num_examples, seed=args.seed)
    contexts = sorted((prompt_context_ids(tok, p) for p in task.eval["prompt"]), key=len, reverse=True)
    groups = [contexts[k : k + args.batch_size] for k in range(0, len(contexts), args.batch_size)]
    pad_id = pad_token_id(tok)
    gen_runs, bare_runs, finished = [], [], []
    model.eval()
    for _ in range(args.repeats):
        with _Meter(model, args.device) as m, torch.no_grad():
            finished = []
            for group in groups:
                new = _generate_hf(model, tok, group, args.max_new_tokens)
                finished.append([c + n for c, n in zip(group, new)])
        gen_runs.append(m)
        with _Meter(model, args.device) as m:
            bare_forward(model, finished, pad_id)
        bare_runs.append(m)
    tokens = sum(len(s) for b in finished for s in b)
    generated = tokens - sum(len(c) for c in contexts)
    bare = _row("generation: bare forward of the finished sequences", tokens, bare_runs)
    return [bare, _row("generation: greedy, left-padded batches", tokens, gen_runs, bare, generated_tokens=generated,
                       max_new_tokens=args.max_new_tokens)]


def _real_mmlu():
    """gere_hf.evaluation.mmlu's letter scoring, when the module exists and has one of these entry points:
    ``fn(model, tokenizer, prompts, batch_size=...)`` returning per-question letter scores."""
    if importlib.util.find_spec("gere_hf.evaluation.mmlu") is None:
        return None, "gere_hf.evaluation.mmlu does not exist yet: stand-in"
    import gere_hf.evaluation.mmlu as mmlu

    for name in ("score_letter_prompts", "letter_scores", "score_letters"):
        fn = getattr(mmlu, name, None)
        if callable(fn):
            return fn, f"gere_hf.evaluation.mmlu.{name}"
    return None, "gere_hf.evaluation.mmlu has no known letter-scoring entry point: stand-in"


def _mmlu_prompts(tok, args) -> list[str]:
    texts = load_replay_texts("wiki", args.mmlu_questions + 4, seed=args.seed + 1)
    prompts = []
    for i in range(args.mmlu_questions):
        options = "\n".join(f"{letter.strip()}. {texts[(i + k + 1) % len(texts)][:60]}"
                            for k, letter in enumerate(LETTERS))
        prompts.append(f"The following is a multiple choice question.\n\n{texts[i][: args.mmlu_chars]}\nWhich is "
                       f"right?\n{options}\nAnswer:")
    return prompts


def letter_forward(model, tok, prompts: list[str], batch_size: int, letter_ids: list[int]) -> list[list[float]]:
    """The stand-in: one left-padded forward per batch of questions, logits of the last position only."""
    device = next(model.parameters()).device
    contexts = [prompt_context_ids(tok, p) for p in prompts]
    out = []
    with torch.no_grad():
        for k in range(0, len(contexts), batch_size):
            ids, mask = _pad(contexts[k : k + batch_size], pad_token_id(tok), left=True)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           use_cache=False, logits_to_keep=1).logits[:, -1]
            out += torch.log_softmax(logits.float(), -1)[:, letter_ids].tolist()
    return out


def bench_mmlu(model, tok, args) -> list[dict]:
    prompts = _mmlu_prompts(tok, args)
    contexts = [prompt_context_ids(tok, p) for p in prompts]
    tokens = sum(len(c) for c in contexts)
    order = sorted(contexts, key=len, reverse=True)
    batches = [order[k : k + args.batch_size] for k in range(0, len(order), args.batch_size)]
    letter_ids = [tokenize_text(tok, x, add_special_tokens=False)[-1] for x in LETTERS]
    real, source = _real_mmlu()
    pad_id = pad_token_id(tok)
    runs = {k: [] for k in ("bare", "letters", "choices")}
    forwards = []
    counter = model.register_forward_pre_hook(lambda m, a, kw: forwards.append(1), with_kwargs=True)
    model.eval()
    try:
        for _ in range(args.repeats):
            for key in runs:
                forwards.clear()
                with _Meter(model, args.device) as m:
                    if key == "bare":
                        bare_forward(model, batches, pad_id)
                    elif key == "letters":
                        if real is not None:
                            real(model, tok, prompts, batch_size=args.batch_size)
                        else:
                            letter_forward(model, tok, prompts, args.batch_size, letter_ids)
                        letter_calls = len(forwards)
                    else:
                        choice_logprobs(model, tok, prompts, [list(LETTERS)] * len(prompts), 4 * args.batch_size,
                                        progress=False)
                        choice_calls = len(forwards)
                runs[key].append(m)
    finally:
        counter.remove()
    bare = _row("MMLU letters: bare forward (all logits)", tokens, runs["bare"], questions=len(prompts))
    return [bare,
            _row(f"MMLU letters: {source}", tokens, runs["letters"], bare, questions=len(prompts),
                 forwards=letter_calls, questions_per_forward=len(prompts) / letter_calls),
            _row("MMLU letters as 4 choices (choice_logprobs, eos scored)", tokens, runs["choices"], bare,
                 questions=len(prompts), forwards=choice_calls)]


def bench_general(model, tok, args) -> list[dict]:
    texts = load_replay_texts("wiki", args.general_texts, seed=args.seed + 2)
    encoded = sorted((tokenize_text(tok, t, add_special_tokens=False)[: args.general_max_length] for t in texts),
                     key=len, reverse=True)
    batches = [encoded[k : k + args.general_batch_size] for k in range(0, len(encoded), args.general_batch_size)]
    tokens = sum(len(e) for e in encoded)
    runs = {"bare": [], "full": [], "nll": []}
    for _ in range(args.repeats):
        with _Meter(model, args.device) as m:
            bare_forward(model, batches, pad_token_id(tok))
        runs["bare"].append(m)
        with _Meter(model, args.device) as m:
            full_logits_nll(model, batches, pad_token_id(tok))
        runs["full"].append(m)
        with _Meter(model, args.device) as m:
            general_perplexity(model, tok, texts, args.general_max_length, args.general_batch_size, progress=False)
        runs["nll"].append(m)
    bare = _row("general NLL: bare forward (all logits)", tokens, runs["bare"])
    return [bare, _row("general NLL: all logits upcast, one cross-entropy (before)", tokens, runs["full"], bare),
            _row("general NLL: general_perplexity (head in chunks)", tokens, runs["nll"], bare)]


def full_logits_nll(model, batches: list[list[list[int]]], pad_id: int) -> float:
    """What general_perplexity did before the chunks: all logits, one float32 copy, one cross-entropy."""
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for seqs in batches:
            ids, mask = _pad(seqs, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                             labels.reshape(-1), ignore_index=-100, reduction="sum"))
    return total


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m, llama3-vocab (tiny body, 128,256-token vocabulary), tiny, llama-1b-shape "
                             "or a path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--tiny-hidden", type=int, default=64, help="hidden size of llama3-vocab / tiny")
    parser.add_argument("--tasks", default="polarity,wiki_topic", help="closed built-in tasks for choice scoring")
    parser.add_argument("--num-examples", type=int, default=16, help="eval examples per task")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (gere_hf's default)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--mmlu-questions", type=int, default=32)
    parser.add_argument("--mmlu-chars", type=int, default=500, help="characters of the stand-in questions")
    parser.add_argument("--general-texts", type=int, default=16)
    parser.add_argument("--general-max-length", type=int, default=563)
    parser.add_argument("--general-batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of every row; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: choices,generation,mmlu,general")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(args.skip.split(",")) - {""}

    model, tok = bench_model(args.model, args.dtype, args.device, tiny_hidden=args.tiny_hidden)
    model.eval()
    # Warm-up: the first forwards of a process pay for allocator growth and kernel selection.
    bare_forward(model, [[[5, 6, 7, 8]] * 2], pad_token_id(tok))
    rows = []
    for part, fn in (("choices", bench_choices), ("generation", bench_generation), ("mmlu", bench_mmlu),
                     ("general", bench_general)):
        if part not in skip:
            rows += fn(model, tok, args)
            print(f"[bench_eval] {part} done", file=sys.stderr, flush=True)
    results = {
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
                        "load_average": list(os.getloadavg()),
                        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "model": {"name": args.model, "vocab_size": int(model.config.vocab_size),
                  "hidden_size": int(model.config.hidden_size), "parameters": sum(p.numel() for p in model.parameters())},
        "rows": rows,
    }
    print(f"\nEvaluation benchmark: {args.model} (vocab {model.config.vocab_size}, hidden {model.config.hidden_size}), "
          f"{args.device} {args.dtype}, batch {args.batch_size}, {torch.get_num_threads()} threads, best of "
          f"{args.repeats}, load average {os.getloadavg()[0]:.1f}")
    print("| measure | tokens | tokens/s | vs bare (wall / CPU) | largest logits MiB | peak MiB | runs (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['ratio_to_bare']:.2f}× / {r['ratio_to_bare_cpu']:.2f}×" if "ratio_to_bare" in r else "1")
        print(f"| {r['name']} | {r['tokens']} | {r['tokens_per_second']:.0f} | {ratio} | "
              f"{_mib(r['largest_logits_bytes'])} | {_mib(r['peak_memory_bytes'])} | "
              f"{', '.join(f'{s:.2f}' for s in r['seconds_runs'])} |")
    for r in rows:
        if "questions_per_forward" in r:
            print(f"{r['name']}: {r['forwards']} forwards for {r['questions']} questions "
                  f"({r['questions_per_forward']:.1f} questions per forward, batch {args.batch_size})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
