"""gere_hf: General Sample Replay (GeRe) for continual fine-tuning, as a drop-in for transformers and TRL trainers."""

__version__ = "0.1.0"

from .collator import GeReCollator
from .config import GeReConfig, GeReConfigError
from .losses import (
    causal_lm_loss,
    dynamic_weight,
    feature_imitation_loss,
    logit_imitation_loss,
    threshold_labels,
    threshold_margin_loss,
)
from .models import UnsupportedModelError, find_final_norm, load_model_and_tokenizer
from .reference import ReferenceStates, ReferenceStatesError, ReferenceStatesMismatch
from .replay import ReplayDataError, ReplaySet, load_replay_texts, replay_heldout_texts
from .schedule import ReplaySchedule, ReplayScheduleError
from .trainer import GeReSFTTrainer, GeReTrainer, GeReTrainingError

__all__ = [
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
    "UnsupportedModelError",
    "causal_lm_loss",
    "dynamic_weight",
    "feature_imitation_loss",
    "find_final_norm",
    "load_model_and_tokenizer",
    "load_replay_texts",
    "logit_imitation_loss",
    "replay_heldout_texts",
    "threshold_labels",
    "threshold_margin_loss",
]
