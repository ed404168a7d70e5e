"""What a recipe is checked against before any work, once its model is known: the base model's config, module names
and tokenizer, the store folder, and what the training data becomes under the training arguments.

Nothing here writes or loads weights: the model's module names come from an empty (meta-device) instance of its
config. Each check fails with a :class:`~gere_hf.continual.recipe.RecipeError` naming the recipe key and the fix:

* ``peft.target_modules`` entries that match no module of the model (PEFT ignores them, or fails inside stage 1);
* ``gere.replay_max_length`` / ``evaluation.general_max_length`` longer than the model's positions;
* ``gere.replay_per_step`` larger than the replay set (the same texts several times in one step);
* ``gere.store_dir`` that is a file, or a folder of other files;
* a stage whose examples mostly vanish under ``training.max_length`` (TRL drops an example whose completion is cut
  off entirely; :func:`examples_kept` counts them as TRL will).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from ..models import tiny_llama
from ..reference import foreign_files
from .adapters import load_tokenizer, zero3_hidden
from .recipe import TINY_MODEL, Recipe, RecipeError

logger = logging.getLogger(__name__)

# Config attributes that hold the number of positions a model was built for, by model family.
_POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")
# A stage whose kept share of examples under training.max_length is below this is refused ("most vanish").
MIN_KEPT_SHARE = 0.5


@dataclass
class ModelFacts:
    """What the checks need to know of the base model: its config, module names and tokenizer."""

    config: Any
    module_names: list[str]
    linear_names: list[str]
    tokenizer: Any

    @property
    def positions(self) -> int | None:
        for attribute in _POSITION_ATTRIBUTES:
            value = getattr(self.config, attribute, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def model_facts(recipe: Recipe, base_path: str) -> ModelFacts:
    """The base model's config, module names (from an empty instance) and tokenizer, read without its weights."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = recipe.model.trust_remote_code
    if recipe.model.name_or_path == TINY_MODEL:
        from transformers import ByT5Tokenizer

        config, tokenizer = tiny_llama(seed=recipe.seed).config, ByT5Tokenizer()
    else:
        try:
            config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust)
            tokenizer = load_tokenizer(base_path, trust)
        except (OSError, ValueError) as err:
            raise RecipeError(
                f"model: cannot read the model {recipe.model.name_or_path!r} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Give a local model folder (config.json, weights, "
                "tokenizer), a Hub id in the Hugging Face cache, or a built-in name (smollm2-135m)."
            ) from None
    names, linear = [], []
    try:
        # Parameters on the meta device (no memory, no weights read); ZeRO-3's partitioning hooks kept out of it.
        with zero3_hidden(), init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
        names = [name for name, _ in empty.named_modules() if name]
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in empty.named_modules()
                         if isinstance(module, torch.nn.Linear)})
    except Exception as err:  # a model class that cannot be built empty: its module names are not checked here
        logger.warning("Cannot build an empty %s to check peft.target_modules against (%s: %s); PEFT checks them "
                       "when stage 1 starts.", type(config).__name__, type(err).__name__, err)
    return ModelFacts(config, names, linear, tokenizer)


def _matches(name: str, key: str) -> bool:
    """PEFT's rule for a ``target_modules`` list entry: the module's whole name or its dotted suffix."""
    return name == key or name.endswith(f".{key}")


def check_target_modules(target_modules: Any, facts: ModelFacts, model_name: str) -> None:
    """Every entry of ``peft.target_modules`` must name modules of the model (a string is a regex over full names)."""
    if target_modules is None or target_modules == "all-linear" or not facts.module_names:
        return
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, n) for n in facts.module_names):
            raise RecipeError(
                f"peft.target_modules: the pattern {target_modules!r} matches no module of {model_name}. Its linear "
                f"layers are named {', '.join(facts.linear_names)}; give a list of them (or 'all-linear')."
            )
        return
    missing = [key for key in target_modules if not any(_matches(n, key) for n in facts.module_names)]
    if missing:
        raise RecipeError(
            f"peft.target_modules: {missing} name no module of {model_name}; its linear layers are named "
            f"{', '.join(facts.linear_names)}. Fix the names (or use 'all-linear')."
        )


def check_lengths(recipe: Recipe, facts: ModelFacts) -> None:
    """Token lengths the model cannot hold: replay texts and general texts beyond its positions."""
    positions = facts.positions
    if positions is None:
        return
    name = recipe.model.name_or_path
    for key, value in (("gere.replay_max_length", recipe.gere.replay_max_length if recipe.gere.replay_enabled
                        else None),
                       ("evaluation.general_max_length", recipe.evaluation.general_max_length
                        if recipe.evaluation.enabled and recipe.evaluation.general_texts > 0 else None)):
        if value is not None and value > positions:
            raise RecipeError(
                f"{key}={value} is longer than the {positions} positions {name} was built for: its texts would be "
                f"read past the positions the model knows. Lower {key} to at most {positions}."
            )


def check_replay_per_step(recipe: Recipe, replay_texts: list[str] | None) -> None:
    per_step = recipe.gere.replay_per_step
    if not recipe.gere.replay_enabled or per_step is None or replay_texts is None:
        return
    if per_step > len(replay_texts):
        raise RecipeError(
            f"gere.replay_per_step={per_step} is more than the {len(replay_texts)} replay texts: every step would "
            f"replay the same texts several times. Lower gere.replay_per_step to at most {len(replay_texts)}, or "
            "raise gere.replay_num_samples."
        )


def check_store_dir(path: str, key: str = "gere.store_dir") -> None:
    """A store folder is absent, empty, a store, or an interrupted build; a file or a folder of other files is
    refused before anything is written (the store is built at stage 1, long after)."""
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise RecipeError(f"{key}: {path} is a file. Give the path of a folder for the reference store (it is "
                          "created if missing).")
    names = foreign_files(path)
    if names:
        raise RecipeError(
            f"{key}: {path} holds {', '.join(names[:5])} but no reference store. Give an empty or new "
            "folder, or the folder of a store built from this base model."
        )


def examples_kept(task, tokenizer, max_length: int | None, truncation_mode: str = "keep_start",
                  completion_only_loss: bool | None = None) -> tuple[int, int]:
    """``(kept, longest)``: how many training examples keep a completion token within ``max_length`` (TRL's SFT
    drops the others), and the longest prompt+completion in tokens. The eos token TRL appends counts."""
    rows = task.train
    eos = getattr(tokenizer, "eos_token", None) or ""
    prompts = list(rows["prompt"])
    full = [p + c if not eos or c.endswith(eos) else p + c + eos for p, c in zip(prompts, rows["completion"])]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=True)["input_ids"]
    longest = max((len(ids) for ids in full_ids), default=0)
    if max_length is None or completion_only_loss is False or truncation_mode == "keep_end":
        return len(prompts), longest
    kept = 0
    for p, f in zip(prompt_ids, full_ids):
        common = 0
        for a, b in zip(p, f):
            if a != b:
                break
            common += 1
        kept += common < min(len(f), max_length)  # a completion token survives truncation to max_length
    return kept, longest


def check_examples_kept(recipe: Recipe, tasks: list, tokenizer, stage_args: list) -> list[dict]:
    """Per stage ``{"given", "kept_by_max_length", "longest_tokens"}``; a stage that keeps fewer than half its
    examples under ``training.max_length`` is refused, fewer than all is a warning."""
    counts = []
    for index, (stage, task, args) in enumerate(zip(recipe.stages, tasks, stage_args), start=1):
        max_length = getattr(args, "max_length", None)
        kept, longest = examples_kept(task, tokenizer, max_length, getattr(args, "truncation_mode", "keep_start"),
                                      getattr(args, "completion_only_loss", None))
        given = len(task.train)
        counts.append({"given": given, "kept_by_max_length": kept, "longest_tokens": longest})
        where = f"stages[{index - 1}] ({stage.name})"
        lost = given - kept
        if lost and kept < MIN_KEPT_SHARE * given:
            raise RecipeError(
                f"{where}: training.max_length={max_length} leaves {kept} of its {given} training examples: TRL drops "
                f"the {lost} whose prompt fills max_length (nothing of their answer is left to learn). The longest "
                f"example is {longest} tokens: raise training.max_length to {longest} (or set it for this stage in "
                f"{where}.training), or shorten the prompts."
            )
        if lost:
            logger.warning("%s: training.max_length=%s drops %d of %d training examples (their prompt fills it; the "
                           "longest example is %d tokens).", where, max_length, lost, given, longest)
    return counts


__all__ = ["MIN_KEPT_SHARE", "ModelFacts", "check_examples_kept", "check_lengths", "check_replay_per_step",
           "check_store_dir", "check_target_modules", "examples_kept", "model_facts"]
