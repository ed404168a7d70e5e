"""`GeReTrainer` and `GeReSFTTrainer`: `transformers.Trainer` / `trl.SFTTrainer` with general sample replay.

Replace ``Trainer(...)`` with ``GeReTrainer(..., gere_config=GeReConfig())`` and nothing else in the script changes.
At the start of ``train()`` the reference store is opened (fingerprint-checked) or built; every micro-batch then
carries the replay samples the :class:`~gere_hf.schedule.ReplaySchedule` assigns to it. The task part goes through
the parent's ``compute_loss`` untouched; the replay part is a second forward (replay texts are long, task samples
short: one padded forward would waste compute), with the final norm's output captured by a forward hook.

Loss of a micro-batch with replay, as in the official code::

    total = mean(task CE, replay CE) + w · replay term        (term: tm, kl, l1 or l2; none for 'ce')

Returned already scaled for gradient accumulation (``loss_is_scaled_for_ga = True``): both CE terms are token means
over the whole optimizer step on all processes (the task CE keeps the parent's ``num_items_in_batch``
normalisation; the replay CE is divided by the step's replay target count, known from the schedule), so they do not
depend on how a step is split into micro-batches or processes. The replay term is a per-micro-batch quantity (its
normaliser counts non-zero hinge terms) and is divided by the number of micro-batches in the step.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from transformers import Trainer, TrainerCallback

from .collator import GeReCollator, split_replay_inputs
from .config import GeReConfig, GeReConfigError
from .losses import (
    dynamic_weight,
    feature_imitation_loss,
    logit_imitation_loss,
    threshold_margin_loss,
)
from .models import check_causal_lm, find_final_norm
from .reference import (
    FINGERPRINT_FIELDS,
    ReferenceStates,
    ReferenceStatesMismatch,
    compute_fingerprint,
    unpack_labels,
)
from .replay import ReplaySet
from .schedule import ReplaySchedule

logger = logging.getLogger(__name__)

_METRICS = ("task_loss", "replay_ce", "replay_term", "replay_weight")


class GeReTrainingError(RuntimeError):
    """Training cannot go on: a batch GeRe cannot use, or a non-finite loss."""


class _PrepareReplayCallback(TrainerCallback):
    """Opens or builds the store once the model is wrapped (a ZeRO-3 engine is needed for the build's forward)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._gere_prepare()


class GeReMixin:
    """Adds GeRe replay to a `transformers.Trainer` subclass. See the module docstring."""

    def __init__(
        self,
        *args,
        gere_config: GeReConfig | None = None,
        reference_states: ReferenceStates | None = None,
        replay_set: ReplaySet | None = None,
        **kwargs,
    ):
        if gere_config is None:
            gere_config = GeReConfig()
        if not isinstance(gere_config, GeReConfig):
            raise GeReConfigError(f"gere_config must be a GeReConfig, got {type(gere_config).__name__}.")
        self.gere_config = gere_config
        self.gere_store = reference_states
        self.gere_replay = replay_set
        self.gere_schedule: ReplaySchedule | None = None
        self.gere_collator: GeReCollator | None = None
        # What the parent would decide for its own loss, before this class declares its loss scaled.
        self._gere_parent_scaled = getattr(type(self), "loss_is_scaled_for_ga", None)
        super().__init__(*args, **kwargs)
        self._gere_steps_per_epoch = None
        self._gere_last_step = -1
        self._gere_micro = 0
        self._gere_step_targets = 0
        self._gere_sums = torch.zeros(2 * len(_METRICS), dtype=torch.float64)
        self._gere_samples_seen = 0
        self._gere_nonfinite_skipped = 0
        self.gere_data_seconds = 0.0
        if self.gere_config.replay_enabled:
            check_causal_lm(self.model)
            self._gere_make_schedule(steps_per_epoch=1)  # a bad replay_per_step fails here, before any work
            if self._gere_tokenizer() is None and reference_states is None and replay_set is None:
                raise GeReConfigError(
                    "GeRe needs a tokenizer to tokenise the replay texts: pass processing_class=tokenizer, or a "
                    "ready reference_states= / replay_set=."
                )
            self.loss_is_scaled_for_ga = True
            self.add_callback(_PrepareReplayCallback(self))

    # -- preparation --------------------------------------------------------------------------------------------------

    @property
    def _gere_active(self) -> bool:
        return self.gere_config.replay_enabled and self.gere_collator is not None

    def _gere_tokenizer(self):
        pc = getattr(self, "processing_class", None)
        return getattr(pc, "tokenizer", pc)

    def _gere_make_schedule(self, steps_per_epoch: int) -> ReplaySchedule:
        return ReplaySchedule(
            num_samples=len(self.gere_store) if self.gere_store is not None else max(self.gere_config.replay_num_samples, 1),
            world_size=self.args.world_size,
            grad_accum=self.args.gradient_accumulation_steps,
            steps_per_epoch=max(int(steps_per_epoch), 1),
            per_step=self.gere_config.replay_per_step,
            seed=self.gere_config.replay_seed,
        )

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self._gere_steps_per_epoch = values[1]  # num_update_steps_per_epoch: the default mix spreads over it
        return values

    def _gere_store_dir(self) -> str:
        cfg = self.gere_config
        store_dir = cfg.store_dir or os.path.join(self.args.output_dir, "gere_store")
        return os.path.join(store_dir, "stage_start") if cfg.reference == "stage_start" else store_dir

    def _gere_prepare(self) -> None:
        cfg = self.gere_config
        if self.gere_store is None or cfg.reference == "stage_start":
            self.gere_store = self._gere_open_or_build()
        self.gere_store.require_extras(cfg.store_extras)
        if abs(self.gere_store.k - cfg.threshold_k) > 1e-12:
            raise ReferenceStatesMismatch(self.gere_store.path, {"k": (self.gere_store.k, cfg.threshold_k)})
        tokenizer = self._gere_tokenizer()
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.gere_collator = GeReCollator(
            self.gere_store, pad_id if pad_id is not None else 0, extras=cfg.store_extras,
            need_labels=cfg.loss == "tm",
        )
        self.gere_schedule = self._gere_make_schedule(self._gere_steps_per_epoch or 1)
        _, self._gere_norm = find_final_norm(self.model)
        device = self.args.device
        self._gere_lower = self.gere_store.lower.to(device)
        self._gere_upper = self.gere_store.upper.to(device)
        self._gere_sums = torch.zeros(2 * len(_METRICS), dtype=torch.float64)
        logger.info(
            "GeRe: %s replay of %d samples (%d tokens) from %s; %s", cfg.loss, len(self.gere_store),
            self.gere_store.num_tokens, self.gere_store.path,
            f"{cfg.replay_per_step} per optimizer step" if cfg.replay_per_step else "each once per epoch",
        )

    def _gere_open_or_build(self) -> ReferenceStates:
        cfg = self.gere_config
        tokenizer = self._gere_tokenizer()
        replay = self.gere_replay
        if replay is None:
            replay = ReplaySet.load(
                tokenizer, cfg.replay_source, cfg.replay_num_samples, cfg.replay_max_length, cfg.replay_seed,
                cfg.replay_text_column,
            )
            self.gere_replay = replay
        store_dir = self._gere_store_dir()
        fingerprint = compute_fingerprint(self.model, replay, cfg.threshold_k)
        rebuild = cfg.rebuild_store or (cfg.reference == "stage_start" and not self._gere_resuming)
        if ReferenceStates.is_store(store_dir) and not rebuild:
            # 'base' stores outlive the base weights: later stages open them with a fine-tuned model.
            fields = [f for f in FINGERPRINT_FIELDS if f != "model_weights"]
            store = ReferenceStates.open(store_dir, fingerprint, fields=fields)
            if store.fingerprint["model_weights"] != fingerprint["model_weights"]:
                logger.info("GeRe: the model's weights differ from the store's base model (expected after stage 1).")
            return store
        zero3 = getattr(self, "is_deepspeed_enabled", False) and _zero3()
        return ReferenceStates.build(
            self.model, replay, store_dir, k=cfg.threshold_k, batch_size=cfg.store_batch_size, dtype=cfg.store_dtype,
            extras=cfg.store_extras, topk=cfg.topk, topk_temperature=cfg.kl_temperature,
            reference="base" if cfg.reference == "base" else "current", rebuild=rebuild,
            forward_model=self.model_wrapped if zero3 else None,
        )

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._gere_resuming = bool(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    _gere_resuming = False

    # -- the step -----------------------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._gere_active:
            step = self.state.global_step
            if step != self._gere_last_step:
                self._gere_last_step, self._gere_micro = step, 0
                self._gere_step_targets = self._gere_count_step_targets(step)
            indices = self.gere_schedule.indices(
                step, self._gere_micro, self.args.process_index, self.current_gradient_accumulation_steps
            )
            self._gere_micro += 1
            t0 = time.perf_counter()
            inputs = {**inputs, **self.gere_collator.replay_batch(indices)}
            self.gere_data_seconds += time.perf_counter() - t0
        return super().training_step(model, inputs, num_items_in_batch)

    def _gere_count_step_targets(self, step: int) -> int:
        """Replay CE targets in the whole optimizer step, over all processes: the replay CE's normaliser."""
        start, count = self.gere_schedule.step_range(step)
        lengths = self.gere_store.lengths
        return int(sum(int(lengths[self.gere_schedule.sample_at(p)]) - 1 for p in range(start, start + count)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        task_inputs, replay = split_replay_inputs(inputs)
        if not self._gere_active or not model.training:
            return super().compute_loss(model, task_inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = task_inputs.get("labels")
        if labels is None:
            raise GeReTrainingError(
                f"The task batch has no 'labels' (keys: {sorted(task_inputs)}). GeRe adds replay to a language-model "
                "loss: use a collator that sets labels, e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)."
            )
        # The replay forward runs first: under ZeRO-3, TRL's fused LM head (SFTTrainer) reads lm_head.weight outside
        # the module and its backward fails on the re-partitioned weight when a later forward ran lm_head.
        replay_losses = self._gere_replay_losses(model, replay) if replay else None
        result = super().compute_loss(model, task_inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        task_loss, outputs = result if return_outputs else (result, None)
        ga = self.current_gradient_accumulation_steps
        scaled = self._gere_task_loss_is_scaled(num_items_in_batch)
        task_part = task_loss if scaled else task_loss / ga
        task_mean = self._gere_task_mean(task_loss, labels, num_items_in_batch, scaled)
        terms = {"task_loss": task_mean}
        if not replay:
            total = task_part
        else:
            replay_ce, term = replay_losses
            terms["replay_ce"] = replay_ce.detach()
            # Like the task CE, the replay CE is a token mean over the whole optimizer step on all processes (DDP
            # averages gradients, hence the world size), so it does not depend on how the step is split.
            local_targets = replay["labels"][..., 1:].ne(-100).sum()
            replay_ce_part = replay_ce * local_targets * self.args.world_size / max(self._gere_step_targets, 1)
            total = task_part / 2 + replay_ce_part / 2
            if term is not None:
                fixed = self.gere_config.weight_value
                weight = dynamic_weight((task_mean + replay_ce.detach()) / 2, term) if fixed is None else fixed
                total = total + weight * term / ga
                terms["replay_term"] = term.detach()
                if term.detach() > 0:  # with a zero term the dynamic weight is CE/1e-8 and multiplies nothing
                    terms["replay_weight"] = torch.as_tensor(weight, dtype=torch.float32)
            self._gere_samples_seen += int(replay["input_ids"].shape[0])
        total = self._gere_check_finite(total, terms, model)
        self._gere_accumulate(terms)
        return (total, outputs) if return_outputs else total

    def _gere_task_loss_is_scaled(self, num_items_in_batch) -> bool:
        """Whether the parent normalised its loss over the whole accumulated batch (its own rule)."""
        if self._gere_parent_scaled is not None:
            return bool(self._gere_parent_scaled)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _gere_task_mean(self, task_loss, labels, num_items_in_batch, scaled) -> torch.Tensor:
        """The micro-batch's task CE as a token mean, whatever normalisation the parent used."""
        if not scaled or num_items_in_batch is None:
            return task_loss.detach().float()
        targets = labels[..., 1:] if getattr(self, "_loss_shifts_labels", True) else labels
        local = targets.ne(-100).sum().clamp(min=1)
        scale = self.accelerator.num_processes // self.get_tp_size() if self.args.average_tokens_across_devices else 1
        return (task_loss.detach().float() * num_items_in_batch / (scale * local)).float()

    def _gere_replay_losses(self, model, replay: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss = self.gere_config.loss
        mask = replay["attention_mask"]
        captured = []
        handle = None
        if loss in ("tm", "l1", "l2"):
            handle = self._gere_norm.register_forward_hook(
                lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
            )
        try:
            outputs = model(input_ids=replay["input_ids"], attention_mask=mask, labels=replay["labels"], use_cache=False)
        finally:
            if handle is not None:
                handle.remove()
        replay_ce = outputs.loss.float()
        if not bool(replay["labels"][..., 1:].ne(-100).any()):
            # No sample has a target: the token mean is 0/0. Any other NaN/inf is real and must reach the finite check
            # (zeroed here, it would pass as a CE of 0 while its backward put NaN into the weights).
            replay_ce = torch.nan_to_num(replay_ce, nan=0.0)
        if loss == "ce":
            return replay_ce, None
        if loss == "kl":
            term = logit_imitation_loss(outputs.logits, replay["topk_logprobs"], replay["topk_ids"], mask,
                                        self.gere_config.kl_temperature)
            return replay_ce, term
        hidden = captured[-1]
        if loss == "tm":
            if "packed_labels" in replay:
                packed = replay["packed_labels"]
                labels_tm = unpack_labels(packed).view(*packed.shape[:2], -1)
            else:
                labels_tm = replay["tm_labels"]
            term = threshold_margin_loss(hidden, labels_tm, self._gere_lower, self._gere_upper, mask)
        else:
            term = feature_imitation_loss(hidden, replay["ref_hidden"], mask, p=1 if loss == "l1" else 2)
        return replay_ce, term

    def _gere_check_finite(self, total, terms, model):
        if torch.isfinite(total).all():
            return total
        bad = [name for name, value in terms.items() if not torch.isfinite(torch.as_tensor(value)).all()] or ["total"]
        step = self.state.global_step + 1
        if self.gere_config.nonfinite == "error":
            raise GeReTrainingError(
                f"Non-finite loss at optimizer step {step} (micro-batch {self._gere_micro}); offending term(s): "
                f"{', '.join(bad)}. The last saved checkpoint in {self.args.output_dir} is intact. Lower the learning "
                "rate or the replay weight, or set GeReConfig(nonfinite='skip') to skip such micro-batches."
            )
        self._gere_nonfinite_skipped += 1
        logger.warning("GeRe: skipping a non-finite loss at step %d (term(s): %s).", step, ", ".join(bad))
        for name in list(terms):
            terms.pop(name)
        # A zero that still reaches every trainable parameter, so distributed gradient hooks fire as usual.
        params = [p for p in model.parameters() if p.requires_grad and p.numel() > 0]
        return sum((p.reshape(-1)[:1].sum() * 0.0 for p in params), torch.zeros((), device=total.device))

    # -- logging ------------------------------------------------------------------------------------------------------

    def _gere_accumulate(self, terms: dict) -> None:
        for i, name in enumerate(_METRICS):
            if name in terms:
                self._gere_sums[2 * i] += float(terms[name])
                self._gere_sums[2 * i + 1] += 1

    def log(self, logs, *args, **kwargs):
        if self.gere_config.replay_enabled and self.gere_collator is not None and "loss" in logs:
            sums = self._gere_sums.to(self.args.device)
            extra = torch.tensor([self._gere_samples_seen, self._gere_nonfinite_skipped], dtype=torch.float64,
                                 device=self.args.device)
            both = torch.cat([sums, extra])
            if self.args.world_size > 1:
                both = self.accelerator.reduce(both, reduction="sum")
            both = both.cpu()
            for i, name in enumerate(_METRICS):
                if both[2 * i + 1] > 0:
                    logs[name] = round(float(both[2 * i] / both[2 * i + 1]), 6)
            logs["replay_samples_seen"] = int(both[-2])
            if both[-1] > 0:
                logs["nonfinite_skipped"] = int(both[-1])
            self._gere_sums.zero_()
        return super().log(logs, *args, **kwargs)


def _zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


class GeReTrainer(GeReMixin, Trainer):
    """`transformers.Trainer` with GeRe replay: the same arguments plus ``gere_config=GeReConfig(...)``."""


try:
    from trl import SFTTrainer
except ImportError:  # pragma: no cover - trl is a dependency
    SFTTrainer = None

if SFTTrainer is not None:

    class GeReSFTTrainer(GeReMixin, SFTTrainer):
        """`trl.SFTTrainer` with GeRe replay: the same arguments plus ``gere_config=GeReConfig(...)``."""


__all__ = ["GeReMixin", "GeReTrainer", "GeReSFTTrainer", "GeReTrainingError"]

