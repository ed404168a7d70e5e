"""gere_hf: General Sample Replay (GeRe) for continual fine-tuning, as a drop-in for transformers and TRL trainers."""

__version__ = "0.1.0"

# Public names load on first use: `gere-hf inspect` should not pay for importing trl and the Trainer stack.
_LAZY = {
    "ExcludedTexts": ".replay",
    "GeReCollator": ".collator",
    "GeReConfig": ".config",
    "GeReConfigError": ".config",
    "GeReSFTTrainer": ".trainer",
    "GeReTrainer": ".trainer",
    "GeReTrainingError": ".trainer",
    "ReferenceStates": ".reference",
    "ReferenceStatesError": ".reference",
    "ReferenceStatesMismatch": ".reference",
    "ReplayDataError": ".replay",
    "ReplaySchedule": ".schedule",
    "ReplayScheduleError": ".schedule",
    "ReplaySet": ".replay",
    "ReplayTerm": ".replay_terms",
    "UnsupportedModelError": ".models",
    "causal_lm_loss": ".losses",
    "dynamic_weight": ".losses",
    "feature_imitation_loss": ".losses",
    "find_final_norm": ".models",
    "load_model_and_tokenizer": ".models",
    "load_replay_texts": ".replay",
    "logit_imitation_loss": ".losses",
    "register_replay_term": ".replay_terms",
    "replay_heldout_texts": ".replay",
    "select_heldout_texts": ".replay",
    "threshold_labels": ".losses",
    "threshold_margin_loss": ".losses",
    "token_nll": ".losses",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gere_hf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [  # noqa: F822 (lazily provided by __getattr__)
    "ExcludedTexts",
    "GeReCollator",
    "GeReConfig",
    "GeReConfigError",
    "GeReSFTTrainer",
    "GeReTrainer",
    "GeReTrainingError",
    "ReferenceStates",
    "ReferenceStatesError",
    "ReferenceStatesMismatch",
    "ReplayDataError",
    "ReplaySchedule",
    "ReplayScheduleError",
    "ReplaySet",
    "ReplayTerm",
    "UnsupportedModelError",
    "causal_lm_loss",
    "dynamic_weight",
    "feature_imitation_loss",
    "find_final_norm",
    "load_model_and_tokenizer",
    "load_replay_texts",
    "logit_imitation_loss",
    "register_replay_term",
    "replay_heldout_texts",
    "select_heldout_texts",
    "threshold_labels",
    "threshold_margin_loss",
    "token_nll",
]
