"""`GeReConfig`: everything GeRe adds to a Trainer, as a dataclass usable with `HfArgumentParser`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .losses import CE_REDUCTIONS
from .replay_terms import ReplayTerm, get_replay_term, replay_loss_names

REFERENCES = ("base", "stage_start")
NONFINITE_POLICIES = ("error", "skip")


class GeReConfigError(ValueError):
    """A GeRe option with a value that cannot work."""


@dataclass
class GeReConfig:
    """Options of GeRe replay. Defaults follow the paper: 1,000 general texts of ≤563 tokens, TM loss, dynamic weight."""

    loss: str = field(
        default="tm",
        metadata={"help": "Replay loss: 'tm' (replay CE + threshold margin, the paper's BaselineR+TM), 'ce' (vanilla "
                  "replay), 'kl' (replay CE + top-k logit imitation), 'l1'/'l2' (replay CE + feature imitation), "
                  "'none' (no replay: plain fine-tuning)."},
    )
    weight: str = field(
        default="dy",
        metadata={"help": "Weight w of the replay term: a non-negative number, 'dy' (dynamic: w = CE / term, "
                  "detached, as in the official code), or 'dy:C' (dynamic, at most C: the term's gradient never exceeds "
                  "C times its own, however small the violations; docs/losses.md)."},
    )
    threshold_k: float = field(
        default=1.0, metadata={"help": "Thresholds are mean ± k·std per hidden dimension over all replay tokens."}
    )
    replay_source: str = field(
        default="wiki",
        metadata={"help": "Replay texts: 'wiki' (built-in offline Wikipedia summaries), a local jsonl/json/parquet/"
                  "csv/txt file or folder, or a Hub dataset id."},
    )
    replay_num_samples: int = field(default=1000, metadata={"help": "Number of replay texts."})
    replay_max_length: int = field(default=563, metadata={"help": "Replay texts are truncated to this many tokens."})
    replay_text_column: str = field(default="text", metadata={"help": "Column of the replay source holding text."})
    replay_seed: int = field(default=0, metadata={"help": "Seed of the replay selection and of the replay order."})
    replay_share: str = field(
        default="samples",
        metadata={"help": "Weight of the replay part in each optimizer step's loss. 'samples': its share of the "
                  "step's samples, s = n_replay / (n_task + n_replay) over all processes and accumulation steps, "
                  "loss = (1 - s)·task CE + s·(replay CE + w·term): every sample counts once, as in the paper's runs "
                  "(per-device batch 1 with gradient accumulation). A number s in (0, 1): a fixed share, loss = "
                  "(1 - s)·task CE + s·replay CE + w·term; 0.5 is the official code's formula for a micro-batch "
                  "holding one task and one replay sample (with several replay samples in a micro-batch the official "
                  "code pools TM over them, gere_hf averages per-sample TM values). Equations in docs/losses.md."},
    )
    ce_reduction: str = field(
        default="sample_mean",
        metadata={"help": "How each CE averages within its kind (task, replay). 'sample_mean': every sample's CE is "
                  "its own token mean and the step averages samples, as the paper's runs with per-device batch 1 "
                  "and gradient accumulation (a 2-token and a 20-token label weigh the same). 'token_mean': the mean "
                  "over all the step's target tokens of that kind, as TRL's and Trainer's plain SFT step (longer "
                  "samples weigh more)."},
    )
    replay_per_step: int | None = field(
        default=None,
        metadata={"help": "Batch interpolation (BI): exactly this many replay samples in every optimizer step, summed "
                  "over processes and accumulation steps and spread over its micro-batches as evenly as they go (4 "
                  "with per-device batch 1 and 16 accumulation steps: one in every fourth micro-batch). Default "
                  "(None): every replay sample once per epoch, spread evenly over the epoch's steps."},
    )
    store_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the reference store; built there when missing. Default: "
                  "<output_dir>/gere_store."},
    )
    reference: str = field(
        default="base",
        metadata={"help": "'base': the model as given before any continual training (a PeftModel's adapter-disabled "
                  "base); 'stage_start': rebuilt from the current model at the start of each train()."},
    )
    store_batch_size: int = field(default=16, metadata={"help": "Batch size of the store build's forward."})
    store_dtype: str | None = field(
        default=None,
        metadata={"help": "Precision the store is recorded at (bf16, fp16, fp32). Default: the training precision "
                  "(bf16/fp16 from the training arguments or the DeepSpeed config, else the base weights' dtype); a "
                  "store recorded at another precision is refused."},
    )
    topk: int = field(default=32, metadata={"help": "Teacher log-probs kept per token for 'kl'."})
    kl_temperature: float = field(default=1.0, metadata={"help": "Temperature of the 'kl' logit imitation."})
    rebuild_store: bool = field(
        default=False, metadata={"help": "Rebuild the store even if one for other settings exists at store_dir."}
    )
    nonfinite: str = field(
        default="error",
        metadata={"help": "On a NaN/inf loss: 'error' stops with a message naming the step and term; 'skip' drops "
                  "that micro-batch's loss and counts it (logged as nonfinite_skipped)."},
    )

    def __post_init__(self):
        if self.loss not in replay_loss_names():
            raise GeReConfigError(
                f"Unknown GeRe loss {self.loss!r}; choose one of {', '.join(replay_loss_names())} (replay terms are "
                "registered in gere_hf.replay_terms)."
            )
        _ = self.weight_value  # raises on a bad weight
        _ = self.replay_share_value  # raises on a bad share
        for name in ("threshold_k", "kl_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise GeReConfigError(f"{name} must be a positive finite number, got {value!r}.")
        if self.reference not in REFERENCES:
            raise GeReConfigError(f"Unknown reference {self.reference!r}; choose one of {', '.join(REFERENCES)}.")
        if self.ce_reduction not in CE_REDUCTIONS:
            raise GeReConfigError(
                f"Unknown ce_reduction {self.ce_reduction!r}; choose 'sample_mean' (each sample's token mean, "
                "samples averaged: the paper's runs) or 'token_mean' (all target tokens of the step: TRL's SFT step)."
            )
        if self.nonfinite not in NONFINITE_POLICIES:
            raise GeReConfigError(f"Unknown nonfinite policy {self.nonfinite!r}; choose 'error' or 'skip'.")
        if self.replay_num_samples < 1:
            raise GeReConfigError(f"replay_num_samples must be ≥ 1, got {self.replay_num_samples}.")
        if self.replay_max_length < 2:
            raise GeReConfigError(f"replay_max_length must be ≥ 2, got {self.replay_max_length}.")
        if self.replay_per_step is not None and self.replay_per_step < 1:
            raise GeReConfigError(f"replay_per_step must be ≥ 1 (or None), got {self.replay_per_step}.")
        if self.store_batch_size < 1 or self.topk < 1:
            raise GeReConfigError("store_batch_size and topk must be ≥ 1.")

    @property
    def weight_value(self) -> float | None:
        """The fixed weight, or None for the dynamic weight ('dy', 'dy:C')."""
        if self._dynamic_weight() is not None:
            return None
        try:
            value = float(self.weight)
        except (TypeError, ValueError):
            raise GeReConfigError(
                f"Unknown weight {self.weight!r}; give a non-negative number, 'dy', or 'dy:C' (dynamic, at most C)."
            ) from None
        if not math.isfinite(value) or value < 0:
            raise GeReConfigError(f"The replay weight must be a non-negative finite number or 'dy', got {self.weight!r}.")
        return value

    @property
    def weight_cap(self) -> float | None:
        """The bound C of a capped dynamic weight ('dy:C'); None otherwise."""
        dynamic = self._dynamic_weight()
        return None if dynamic is None else dynamic[1]

    def _dynamic_weight(self) -> tuple[str, float | None] | None:
        text = self.weight.strip().lower() if isinstance(self.weight, str) else None
        if text is None or not (text == "dy" or text.startswith("dy:")):
            return None
        if text == "dy":
            return "dy", None
        name, sep, cap = text.partition(":")
        try:
            value = float(cap) if name == "dy" and sep else float("nan")
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise GeReConfigError(f"weight {self.weight!r}: a capped dynamic weight is 'dy:C' with C a positive "
                                  "number, e.g. 'dy:10'.")
        return "dy", value

    @property
    def replay_share_value(self) -> float | None:
        """The fixed replay share, or None for 'samples' (the step's sample share)."""
        if isinstance(self.replay_share, str) and self.replay_share.strip().lower() == "samples":
            return None
        try:
            value = float(self.replay_share)
        except (TypeError, ValueError):
            raise GeReConfigError(
                f"Unknown replay_share {self.replay_share!r}; give 'samples' (the step's share of replay samples) or "
                "a number strictly between 0 and 1, e.g. 0.5."
            ) from None
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise GeReConfigError(
                f"replay_share must be 'samples' or a number strictly between 0 and 1, got {self.replay_share!r} "
                "(0 would drop the replay, 1 the task; use loss='none' for no replay)."
            )
        return value

    @property
    def replay_enabled(self) -> bool:
        return self.loss != "none"

    @property
    def replay_term(self) -> ReplayTerm | None:
        """The registered replay term of ``loss``; None for 'ce' and 'none'."""
        return get_replay_term(self.loss)

    @property
    def store_extras(self) -> tuple[str, ...]:
        """What the reference store must hold for ``loss`` besides the tokens and labels."""
        term = self.replay_term
        return term.store_extras if term is not None else ()

    def to_dict(self) -> dict:
        return asdict(self)
