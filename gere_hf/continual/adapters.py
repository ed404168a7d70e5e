"""How the model of each stage of a continual run is put together: one LoRA adapter, stacked adapters, or full weights.

Strategies (``adapters.strategy`` of a recipe, with a ``peft`` LoRA config):

* ``continue``: one adapter trained through all stages. Stage t loads the base model with stage t−1's adapter
  (trainable) and goes on training it; every stage saves the whole adapter, a snapshot.
* ``stack``: before stage t the adapters of stages 1..t−1 are merged into the base weights, one after the other, and a
  fresh adapter is trained. Every stage saves only its own adapter; applying adapters 1..t in order to the base model
  gives stage t's model.

With ``peft: null`` (full fine-tuning) every stage saves the full weights and stage t starts from stage t−1's.

Every stage starts from what stage t−1 *saved*, never from objects in memory: a DeepSpeed or FSDP engine leaves hooks
and partitioned parameters on its module, and a resumed run must see exactly what an uninterrupted one saw.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..models import DTYPE_NAMES, ensure_pad_token, resolve_model_path

logger = logging.getLogger(__name__)

STRATEGIES = ("continue", "stack")


class AdapterError(ValueError):
    """An adapter setting that cannot work (unknown strategy, unknown LoRA option, ...)."""


@dataclass
class AdapterConfig:
    """The ``adapters`` section of a recipe (only with a ``peft`` LoRA config)."""

    strategy: str = field(
        default="continue",
        metadata={"help": "'continue': one LoRA adapter through all stages (a snapshot saved after each); 'stack': "
                  "merge the previous adapters into the base before each stage and train a fresh adapter."},
    )

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise AdapterError(f"Unknown adapters.strategy {self.strategy!r}; choose 'continue' or 'stack'.")


def lora_config(options: dict):
    """A ``peft.LoraConfig`` from a recipe's ``peft`` mapping (``task_type`` defaults to CAUSAL_LM)."""
    from peft import LoraConfig

    options = dict(options)
    options.setdefault("task_type", "CAUSAL_LM")
    try:
        return LoraConfig(**options)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"The peft section is not a valid LoRA config: {err}") from None


def lora_fields() -> list[str]:
    from peft import LoraConfig

    return [f.name for f in dataclasses.fields(LoraConfig)]


@contextlib.contextmanager
def zero3_hidden():
    """Hide a registered ZeRO-3 config from transformers, to use full-weight models on one process.

    While a ZeRO-3 TrainingArguments is alive, ``from_pretrained`` partitions weights at load time
    (``deepspeed.zero.Init``) and ``generate`` synchronises every step with the other ranks: both need every rank,
    which defeats merging LoRA weights, or evaluating on the main process alone.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers always has it
        yield
        return
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def _unreadable(folder: str, err: Exception) -> AdapterError:
    names = [n for n in ("adapter_model.safetensors", "model.safetensors") if os.path.isfile(os.path.join(folder, n))]
    shown = os.path.join(folder, names[0]) if names else folder
    detail = str(err).splitlines()[0] if str(err) else ""
    return AdapterError(f"{shown} cannot be read ({type(err).__name__}: {detail}): it is truncated or damaged. Restore "
                        "the stage folder from a copy, or rerun the stage.")


def load_adapter(model, adapter_dir: str, is_trainable: bool = False):
    """``PeftModel.from_pretrained``, with a damaged adapter file named instead of a safetensors traceback."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
    except Exception as err:  # SafetensorError, a header that does not parse, a truncated file
        if not os.path.isdir(adapter_dir):
            raise
        raise _unreadable(adapter_dir, err) from err


def load_saved(load: Callable[[str], object], folder: str):
    """A stage's full weights through ``load``, with a damaged weights file named."""
    try:
        return load(folder)
    except Exception as err:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise
        raise _unreadable(folder, err) from err


def base_with_merged(load: Callable[[str], object], base: str, adapter_dirs: Sequence[str]):
    """The base model with the LoRA adapters in ``adapter_dirs`` merged into its weights, in order."""
    model = load(base)
    for adapter_dir in adapter_dirs:
        model = load_adapter(model, adapter_dir).merge_and_unload()
    return model


def training_model(
    load: Callable[[str], object],
    base: str,
    previous: Sequence[str],
    peft_options: dict | None,
    strategy: str = "continue",
):
    """The model stage t trains, from the saved results of stages 1..t−1 (``previous``, oldest first).

    Args:
        load: ``load(path)`` returns a causal LM loaded from a path (or Hub id).
        base: the base model's path.
        previous: the folders of the finished stages before this one.
        peft_options: the recipe's LoRA options, or None for full fine-tuning.
        strategy: 'continue' or 'stack' (ignored for full fine-tuning).
    """
    if peft_options is None:
        return load_saved(load, previous[-1]) if previous else load(base)
    from peft import get_peft_model

    if strategy == "continue" and previous:
        return load_adapter(load(base), previous[-1], is_trainable=True)
    if strategy == "stack" and previous:
        # Merging needs the full weights: loaded whole on every rank; DeepSpeed partitions the result at its start.
        with zero3_hidden():
            model = base_with_merged(load, base, previous)
    else:
        model = load(base)
    # get_peft_model fills in the config (target modules, base path): each stage gets its own copy.
    return get_peft_model(model, copy.deepcopy(lora_config(peft_options)))


def stage_result_model(
    load: Callable[[str], object],
    base: str,
    stage_dirs: Sequence[str],
    peft_options: dict | None,
    strategy: str = "continue",
    merge: bool = False,
):
    """The model after stage t, rebuilt from disk: ``stage_dirs`` are the folders of stages 1..t, oldest first.

    Full fine-tuning loads stage t's weights; 'continue' applies stage t's adapter to the base; 'stack' merges the
    adapters of stages 1..t−1 into the base in order and applies stage t's. ``merge=True`` also merges the last
    adapter (a plain transformers model).
    """
    if not stage_dirs:
        return load(base)
    if peft_options is None:
        return load_saved(load, stage_dirs[-1])
    model = base_with_merged(load, base, stage_dirs[:-1] if strategy == "stack" else ())
    model = load_adapter(model, stage_dirs[-1])
    return model.merge_and_unload() if merge else model


def method_name(peft_options: dict | None, strategy: str) -> str:
    return "full fine-tuning" if peft_options is None else f"LoRA ({strategy})"


def load_causal_lm(path: str, dtype: str | None = None, trust_remote_code: bool = False):
    """A causal LM from a path, Hub id or built-in name, in ``dtype`` ('float32', 'bfloat16', 'auto'; default fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is None:
        torch_dtype = torch.float32
    elif dtype == "auto":
        torch_dtype = "auto"
    elif dtype in DTYPE_NAMES:
        torch_dtype = getattr(torch, DTYPE_NAMES[dtype])
    else:
        raise AdapterError(f"Unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto.")
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=torch_dtype,
                                                trust_remote_code=trust_remote_code)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)
    return tokenizer
