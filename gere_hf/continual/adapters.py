"""How the model of each stage of a continual run is put together: one adapter, stacked adapters, or full weights.

The adapter types a recipe's ``peft`` section may ask for (``peft.peft_type``) are :data:`ADAPTER_TYPES`: LoRA (the
default) and OSF (orthogonal subspace fine-tuning, ``docs/osf.md``). Strategies (``adapters.strategy``):

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
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..models import DTYPE_NAMES, ensure_pad_token, resolve_model_path

logger = logging.getLogger(__name__)

STRATEGIES = ("continue", "stack")
# OSF's default preserved rank per stage: evenly spaced from the first to the last stage (PEFT's continual example:
# 0.3, 0.5, 0.7 over three tasks).
OSF_DEFAULT_RANKS = (0.3, 0.7)


class AdapterError(ValueError):
    """An adapter setting that cannot work (unknown strategy, unknown LoRA option, ...)."""


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _preserved_rank(v) -> bool:
    """An OSF effective_rank: an absolute rank ≥ 1, or a fraction of the smaller matrix dimension in (0, 1)."""
    if isinstance(v, bool):
        return False
    return v >= 1 if isinstance(v, int) else _finite(v) and 0 < v < 1


PRESERVED_RANK = "an absolute rank ≥ 1 (int) or a fraction of the smaller matrix dimension in (0, 1) (float)"


@dataclass(frozen=True)
class AdapterType:
    """A PEFT method a recipe's ``peft`` section may ask for (``peft.peft_type``).

    Args:
        peft_type: the ``peft.PeftType`` name, as a recipe writes it.
        config_class: the name of its config class in ``peft``.
        label: how reports, metrics and model cards name it.
        ranges: ``{field: (test, what a valid value is)}``, checked after the field's annotation.
        number_fields: fields annotated int that the library uses as any number.
        strategies: the ``adapters.strategy`` values it supports, with why the others cannot work.
        schedule_field: the config field ``adapters.effective_rank_schedule`` sets per stage, if any.
        launches: ``{launch: why it cannot work}`` for the sharded launches ('FSDP', 'ZeRO-3') it cannot train under.
        learning_rate_limit: ``(limit, why)``: learning rates above ``limit`` are refused, for a type that
            trains at another scale than LoRA (a recipe switched from LoRA would otherwise keep LoRA's rate).
    """

    peft_type: str
    config_class: str
    label: str
    ranges: dict = field(default_factory=dict)
    number_fields: frozenset = frozenset()
    strategies: dict = field(default_factory=lambda: dict.fromkeys(STRATEGIES))
    schedule_field: str | None = None
    launches: dict = field(default_factory=dict)
    learning_rate_limit: tuple[float, str] | None = None

    def config_cls(self):
        import peft

        return getattr(peft, self.config_class)

    def fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_cls()) if f.init]


ADAPTER_TYPES: dict[str, AdapterType] = {t.peft_type: t for t in (
    AdapterType(
        "LORA", "LoraConfig", "LoRA",
        ranges={
            "r": (lambda v: v >= 1, "a rank ≥ 1 (e.g. 8 or 16)"),
            "lora_alpha": (lambda v: _finite(v) and v > 0, "a number > 0 (e.g. twice r)"),
            "lora_dropout": (lambda v: _finite(v) and 0 <= v < 1, "a probability in [0, 1)"),
        },
        number_fields=frozenset({"lora_alpha"}),
    ),
    AdapterType(
        "OSF", "OSFConfig", "OSF",
        ranges={
            "effective_rank": (lambda v: v is None or _preserved_rank(v), PRESERVED_RANK + ", or null"),
            "rank_pattern": (lambda v: v is None or all(_preserved_rank(x) for x in v.values()),
                             f"a mapping of module patterns to {PRESERVED_RANK}"),
        },
        strategies={"stack": None, "continue": (
            "OSF freezes the top singular directions of the weights a stage starts from and trains their orthogonal "
            "complement; one adapter continued through the stages keeps the first stage's subspace, which could not "
            "grow with what later stages learn. Use adapters.strategy: stack (each stage merges the previous OSF "
            "adapters into the base and trains a fresh one, as PEFT's continual example does)"
        )},
        schedule_field="effective_rank",
        launches={
            "FSDP": "FSDP2's fully_shard replaces the parameters with sharded ones, and the hooks that project OSF's "
                    "gradients onto the trainable subspace, registered on the original parameters, are lost without "
                    "an error: the run would train unconstrained factors (measured, docs/osf.md)",
            "ZeRO-3": "ZeRO-3 partitions the weights when the model is loaded, and OSF needs each target matrix whole "
                      "for its SVD: PEFT skips the partitioned matrices, and DeepSpeed then fails with no parameter "
                      "to train",
        },
        learning_rate_limit=(1e-3, (
            "OSF trains the orthogonal complement of each target matrix whole (full fine-tuning of most of its rank), "
            "so it needs a full fine-tuning learning rate, not LoRA's: PEFT's continual example uses 5e-6, and on the "
            "benchmark (SmolLM2-135M, AdamW) 2e-3 raised the general-text NLL by 24 nats and left every task at 0 "
            "(docs/lab/experiments.md, section C)"
        )),
    ),
)}


def adapter_type(options: dict | None) -> AdapterType | None:
    """The :class:`AdapterType` a ``peft`` mapping asks for (LoRA without ``peft_type``); None for full fine-tuning."""
    if options is None:
        return None
    name = options.get("peft_type")
    name = "LORA" if name is None else name
    key = str(getattr(name, "value", name)).upper()
    if key not in ADAPTER_TYPES:
        raise AdapterError(
            f"peft.peft_type: recipes train {' or '.join(t.label for t in ADAPTER_TYPES.values())} adapters "
            f"(adapters.strategy continues or stacks them across stages), got {name!r}. Remove peft_type (LoRA is the "
            f"default), set it to one of {', '.join(ADAPTER_TYPES)}, or use GeReSFTTrainer with a peft_config of "
            "your own for other PEFT methods."
        )
    return ADAPTER_TYPES[key]


def peft_config(options: dict):
    """The ``peft`` config (``LoraConfig``, ``OSFConfig``) of a recipe's ``peft`` mapping (``task_type`` defaults to
    CAUSAL_LM)."""
    kind = adapter_type(options)
    options = dict(options)
    options.setdefault("task_type", "CAUSAL_LM")
    try:
        return kind.config_cls()(**options)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"The peft section is not a valid {kind.config_class}: {err}") from None


@dataclass
class AdapterConfig:
    """The ``adapters`` section of a recipe (only with a ``peft`` config)."""

    strategy: str = field(
        default="continue",
        metadata={"help": "'continue': one adapter through all stages (a snapshot saved after each); 'stack': merge "
                  "the previous adapters into the base before each stage and train a fresh adapter (OSF: stack "
                  "only)."},
    )
    effective_rank_schedule: list | None = field(
        default=None,
        metadata={"help": "OSF only: the preserved rank of each stage, one value per stage (floats in (0, 1): a "
                  "fraction of each matrix's smaller dimension; ints: an absolute rank). Default, without "
                  "peft.effective_rank: evenly spaced from 0.3 to 0.7 over the stages (PEFT's example: 0.3, 0.5, "
                  "0.7). See docs/osf.md."},
    )

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise AdapterError(f"Unknown adapters.strategy {self.strategy!r}; choose 'continue' or 'stack'.")
        for i, value in enumerate(self.effective_rank_schedule or ()):
            if not _preserved_rank(value):
                whole = (" (1.0 preserves every direction: nothing would train)"
                         if isinstance(value, float) and value == 1 else "")
                raise AdapterError(f"effective_rank_schedule must give each stage {PRESERVED_RANK}; item {i} is "
                                   f"{value!r}{whole}.")


def check_adapters(options: dict, adapters: AdapterConfig | None, num_stages: int) -> None:
    """The ``adapters`` section against the ``peft`` type and the stages: the strategy the type supports, and a
    schedule only for a type with one, not beside the field it sets, one value per stage."""
    kind = adapter_type(options)
    strategy = adapters.strategy if adapters is not None else "continue"
    if strategy not in kind.strategies:
        raise AdapterError(f"adapters.strategy {strategy!r} is not supported with peft.peft_type {kind.peft_type}.")
    why = kind.strategies[strategy]
    if why is not None:
        raise AdapterError(f"adapters.strategy: {strategy!r} cannot work with peft.peft_type {kind.peft_type}"
                           f"{' (the default without an adapters section)' if adapters is None else ''}: {why}.")
    schedule = adapters.effective_rank_schedule if adapters is not None else None
    if schedule is None:
        return
    if kind.schedule_field is None:
        raise AdapterError(
            f"adapters.effective_rank_schedule is OSF's preserved rank per stage, but peft.peft_type is "
            f"{kind.peft_type}. Remove the schedule, or set peft.peft_type: OSF."
        )
    if options.get(kind.schedule_field) is not None:
        raise AdapterError(
            f"peft.{kind.schedule_field} and adapters.effective_rank_schedule both set the preserved rank. Keep one: "
            f"peft.{kind.schedule_field} for the same rank at every stage, the schedule for one rank per stage."
        )
    if len(schedule) != num_stages:
        raise AdapterError(
            f"adapters.effective_rank_schedule has {len(schedule)} value(s) for {num_stages} stage(s): give one "
            "preserved rank per stage, in stage order."
        )


def effective_rank_schedule(options: dict | None, adapters: AdapterConfig | None, num_stages: int) -> list | None:
    """The preserved rank of each stage for a type with a schedule (OSF): the recipe's schedule, else
    ``peft.effective_rank`` at every stage, else evenly spaced over :data:`OSF_DEFAULT_RANKS`; None for other types."""
    kind = adapter_type(options)
    if kind is None or kind.schedule_field is None:
        return None
    if adapters is not None and adapters.effective_rank_schedule is not None:
        return list(adapters.effective_rank_schedule)
    if options.get(kind.schedule_field) is not None:
        return [options[kind.schedule_field]] * num_stages
    low, high = OSF_DEFAULT_RANKS
    if num_stages == 1:
        return [low]
    return [round(low + (high - low) * i / (num_stages - 1), 6) for i in range(num_stages)]


def adapters_record(options: dict | None, adapters: AdapterConfig | None, num_stages: int) -> dict | None:
    """What ``run_state.json`` records of the adapters: the strategy, and the resolved rank schedule (OSF)."""
    if options is None:
        return None
    record = {"strategy": adapters.strategy if adapters is not None else "continue"}
    schedule = effective_rank_schedule(options, adapters, num_stages)
    if schedule is not None:
        record["effective_rank_schedule"] = schedule
    return record


def check_launch(options: dict | None, launch: str | None) -> None:
    """Refuse an adapter type under a sharded launch ('FSDP', 'ZeRO-3') it cannot train under, naming the fix."""
    kind = adapter_type(options)
    if kind is None or launch not in kind.launches:
        return
    raise AdapterError(
        f"peft.peft_type {kind.peft_type} cannot train under {launch}: {kind.launches[launch]}. Run it in one "
        "process, with DDP or with DeepSpeed ZeRO-2 (tested), or use LoRA under this launch."
    )


def stage_peft_options(options: dict | None, adapters: AdapterConfig | None, index: int,
                       num_stages: int) -> dict | None:
    """The ``peft`` options stage ``index`` (1-based) trains with: the recipe's, with its scheduled rank (OSF)."""
    schedule = effective_rank_schedule(options, adapters, num_stages)
    if schedule is None:
        return options
    return {**options, adapter_type(options).schedule_field: schedule[index - 1]}


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
    """The base model with the adapters in ``adapter_dirs`` (LoRA, OSF) merged into its weights, in order."""
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
        peft_options: the stage's ``peft`` options (:func:`stage_peft_options`), or None for full fine-tuning.
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
    return get_peft_model(model, copy.deepcopy(peft_config(peft_options)))


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
    """'full fine-tuning', 'LoRA (continue)', 'LoRA (stack)', 'OSF (stack)'."""
    return "full fine-tuning" if peft_options is None else f"{adapter_type(peft_options).label} ({strategy})"


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
