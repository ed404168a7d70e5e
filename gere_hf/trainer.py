"""`GeReTrainer` and `GeReSFTTrainer`: `transformers.Trainer` / `trl.SFTTrainer` with general sample replay.

Replace ``Trainer(...)`` with ``GeReTrainer(..., gere_config=GeReConfig())`` and nothing else in the script changes.
At the start of ``train()`` the reference store is opened (fingerprint- and precision-checked) or built; every
micro-batch then carries the replay samples the :class:`~gere_hf.schedule.ReplaySchedule` assigns to it. The task
part goes through the parent's ``compute_loss`` untouched; the replay part is a second forward (replay texts are
long, task samples short: one padded forward would waste compute), with the final norm's output captured by a hook.

Loss of an optimizer step (the defaults: every sample counts once, as in the paper's runs with per-device batch 1
and gradient accumulation)::

    s     = n_replay / (n_task + n_replay)                 (samples in the step, over processes and accumulation)
    total = (1 − s) · mean_i CE_i + s · mean_j (CE_j + w_j · term_j)      w_j = sg(CE_j) / sg(term_j) ('dy')

with CE_i each sample's own token mean. The arithmetic is one pure function, :func:`gere_hf.losses.replay_step_loss`
(its docstring and docs/losses.md give every option: a fixed share, token means instead of sample means); this class
is its plumbing: the task forward's per-token NLL summed per sample (:mod:`gere_hf.samples` finds the samples of
every batch layout), the replay forward, and the step's counts over processes and accumulation micro-batches. The
returned loss is already scaled for gradient accumulation (``loss_is_scaled_for_ga = True``), so a step gives the same
loss and gradients however it is split into micro-batches or processes.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from transformers import Trainer, TrainerCallback

from .collator import GeReCollator, split_replay_inputs
from .config import GeReConfig, GeReConfigError
from .losses import StepCounts, replay_step_loss, token_nll
from .models import (
    check_causal_lm,
    find_final_norm,
    is_peft_model,
    needs_task_ids,
    unwrap_causal_lm,
    virtual_token_count,
)
from .paper import GERE_ARXIV_ID, GERE_PAPER, GERE_TAGS, citation_markdown, method_sentence
from .reference import (
    FINGERPRINT_FIELDS,
    ReferenceStates,
    ReferenceStatesMismatch,
    compute_fingerprint,
    model_precision,
    precision_name,
)
from .replay import ReplaySet
from .replay_terms import ReplayTermInputs
from .samples import count_samples, count_targets, per_sample_sums, sample_ids
from .schedule import ReplaySchedule

logger = logging.getLogger(__name__)

_METRICS = ("task_loss", "replay_ce", "replay_term", "replay_weight", "replay_share")


class _LoggedTerms:
    """The replay terms' sums and counts since the last log (averaged over the micro-batches that had each term), the
    samples seen and the non-finite micro-batches skipped: reduced over processes as one vector, by field name."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(_METRICS, 0.0)
        self.counts = dict.fromkeys(_METRICS, 0)

    def add(self, terms: dict) -> None:
        for name in _METRICS:
            if name in terms:
                self.sums[name] += float(terms[name])
                self.counts[name] += 1

    def reduced(self, trainer, samples_seen: int, nonfinite_skipped: int) -> dict:
        """The log entries: each term's mean, replay_samples_seen, and nonfinite_skipped when some were."""
        names = [*_METRICS]
        vector = torch.tensor([self.sums[n] for n in names] + [self.counts[n] for n in names]
                              + [samples_seen, nonfinite_skipped], dtype=torch.float64, device=trainer.args.device)
        if trainer.args.world_size > 1:
            vector = trainer.accelerator.reduce(vector, reduction="sum")
        values = dict(zip(["sum_" + n for n in names] + ["count_" + n for n in names]
                          + ["samples_seen", "nonfinite_skipped"], vector.cpu().tolist()))
        logs = {n: round(values["sum_" + n] / values["count_" + n], 6) for n in names if values["count_" + n] > 0}
        logs["replay_samples_seen"] = int(values["samples_seen"])
        if values["nonfinite_skipped"] > 0:
            logs["nonfinite_skipped"] = int(values["nonfinite_skipped"])
        self.reset()
        return logs


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
        self._gere_step_counts = StepCounts()
        self._gere_task_counts: tuple[int, int] | None = None  # (samples, targets) of the step being fetched
        self._gere_logged = _LoggedTerms()
        self._gere_samples_seen = 0
        self._gere_nonfinite_skipped = 0
        self.gere_data_seconds = 0.0
        if self.gere_config.replay_enabled:
            check_causal_lm(self.model)
            _check_launch(self.args)
            if needs_task_ids(self.model):
                raise GeReConfigError(
                    f"PEFT {self.model.active_peft_config.peft_type.value} needs task ids for every input, and replay "
                    "texts have none, so GeRe cannot run its replay forward through this model. Use another PEFT "
                    "method (LoRA, prompt tuning, prefix tuning, ...) or loss='none'."
                )
            self._gere_virtual_tokens = virtual_token_count(self.model)
            self._gere_check_task_loss()
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

    def gere_training_precision(self) -> str:
        """The precision the training forward computes in: mixed precision (``bf16``/``fp16``, as TrainingArguments
        or the DeepSpeed config enable it), else the dtype of the model's (base) weights."""
        ds_config = {}
        if getattr(self, "is_deepspeed_enabled", False):
            plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
            ds_config = getattr(plugin, "deepspeed_config", None) or {}
        for name, flag in (("bfloat16", "bf16"), ("float16", "fp16")):
            if getattr(self.args, flag, False) or (ds_config.get(flag) or {}).get("enabled") is True:
                return name
        return model_precision(self.model)

    def _gere_reference_precision(self) -> str:
        """What the store must have been recorded at: ``store_dtype`` if the user set it, else the training's."""
        cfg = self.gere_config
        return precision_name(cfg.store_dtype) if cfg.store_dtype else self.gere_training_precision()

    def _gere_prepare(self) -> None:
        cfg = self.gere_config
        if self.gere_store is None or cfg.reference == "stage_start":
            self.gere_store = self._gere_open_or_build()
        self._gere_check_store(self.gere_store)
        tokenizer = self._gere_tokenizer()
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.gere_collator = GeReCollator(
            self.gere_store, pad_id if pad_id is not None else 0, extras=cfg.store_extras,
            need_labels=cfg.replay_term is not None and cfg.replay_term.needs_labels,
        )
        self.gere_schedule = self._gere_make_schedule(self._gere_steps_per_epoch or 1)
        # Resumed from a checkpoint: the replay samples of the steps before it were seen (counted on the main process;
        # the logged count is summed over processes).
        done = self.state.global_step
        self._gere_samples_seen = (sum(self.gere_schedule.step_range(step)[1] for step in range(done))
                                   if self.args.process_index == 0 else 0)
        _, self._gere_norm = find_final_norm(self.model)
        device = self.args.device
        self._gere_lower = self.gere_store.lower.to(device)
        self._gere_upper = self.gere_store.upper.to(device)
        self._gere_logged = _LoggedTerms()
        logger.info(
            "GeRe: %s replay of %d samples (%d tokens) from %s; %s; replay share %s", cfg.loss, len(self.gere_store),
            self.gere_store.num_tokens, self.gere_store.path,
            f"{cfg.replay_per_step} per optimizer step" if cfg.replay_per_step else "each once per epoch",
            cfg.replay_share,
        )

    def _gere_check_store(self, store: ReferenceStates) -> None:
        """What any store, given or opened, must match: the loss's extras, k, and the training precision."""
        cfg = self.gere_config
        store.require_extras(cfg.store_extras, cfg.topk if "topk" in cfg.store_extras else None,
                             cfg.kl_temperature if "topk" in cfg.store_extras else None)
        if abs(store.k - cfg.threshold_k) > 1e-12:
            raise ReferenceStatesMismatch(store.path, {"k": (store.k, cfg.threshold_k)})
        recorded = store.fingerprint.get("precision")
        wanted = self._gere_reference_precision()
        if recorded is None:
            logger.warning("GeRe: the reference store at %s predates recorded precisions; it cannot be checked "
                           "against this run's %s. Rebuild it (rebuild_store=True) to have it checked.", store.path,
                           wanted)
        elif recorded != wanted:
            training = self.gere_training_precision()
            how = {"bfloat16": "bf16=True", "float16": "fp16=True"}.get(training, f"weights in {training}")
            flag = {"bfloat16": "bf16", "float16": "fp16"}.get(training, "fp32")
            raise ReferenceStatesMismatch(
                store.path, {"precision": (recorded, wanted)},
                detail=(
                    f"The store's reference states were recorded at {recorded}, but this run trains at {training} "
                    f"({how}): the replay term would compare {training} activations with {recorded} ones, and at the "
                    "first step it would be rounding noise instead of 0 (multiplied by the dynamic weight). Rebuild "
                    f"it at the training precision (GeReConfig(rebuild_store=True), or `gere-hf cache ... --dtype "
                    f"{flag} --rebuild`), or, to use it as it is, ask for its precision explicitly: "
                    f"GeReConfig(store_dtype={recorded!r})."
                ),
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
        precision = self._gere_reference_precision()
        fingerprint = compute_fingerprint(self.model, replay, cfg.threshold_k, precision=precision)
        rebuild = cfg.rebuild_store or (cfg.reference == "stage_start" and not self._gere_resuming)
        # An existing store is opened by build() (rank 0's copy decides; nodes without it get one), checked on these
        # fields: 'base' stores outlive the base weights; precision and extras are checked by _gere_check_store.
        fields = [f for f in FINGERPRINT_FIELDS if f not in ("model_weights", "precision")]
        zero3 = getattr(self, "is_deepspeed_enabled", False) and _zero3()
        store = ReferenceStates.build(
            self.model, replay, store_dir, k=cfg.threshold_k, batch_size=cfg.store_batch_size, dtype=precision,
            extras=cfg.store_extras, topk=cfg.topk, topk_temperature=cfg.kl_temperature,
            reference="base" if cfg.reference == "base" else "current", rebuild=rebuild,
            forward_model=self.model_wrapped if zero3 else None, open_fields=fields,
        )
        self._gere_check_base_weights(store, fingerprint["model_weights"])
        return store

    def _gere_check_base_weights(self, store: ReferenceStates, weights: str) -> None:
        """A 'base' store is reused by later stages. Under PEFT the adapter-free weights never change in a continual
        run, so other base weights mean another model: refused. Under full fine-tuning they change by design."""
        stored = store.fingerprint.get("model_weights")
        if stored == weights or self.gere_config.reference != "base":
            return
        if is_peft_model(self.model):
            raise ReferenceStatesMismatch(
                store.path, {"model_weights": (stored, weights)},
                detail=(
                    "The model is a PEFT model whose frozen base weights differ from the base model the store was "
                    f"recorded from (store {stored}, this model {weights}): adapters never change those weights, so "
                    "this is another base model. Point store_dir at a store of this base model, or rebuild "
                    "(GeReConfig(rebuild_store=True)). Adapters merged into the base between stages (stacked "
                    "adapters) change them too: open the store yourself and pass reference_states=, as "
                    "`gere-hf run` does."
                ),
            )
        logger.warning(
            "GeRe: the model's weights (%s) differ from those the reference store at %s was recorded from (%s). "
            "Expected after stage 1 of full fine-tuning; if this is not a later stage, the store belongs to another "
            "model: rebuild it.", weights, store.path, stored,
        )

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._gere_resuming = bool(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    _gere_resuming = False

    # -- the step -----------------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._gere_active:
            # The step's task samples and targets over all processes: the share and the means need them before its
            # first micro-batch's backward. Every rank fetches a step's batches here, so the reduction is collective.
            local = [sum(count_samples(b) for b in batch_samples), sum(count_targets(b) for b in batch_samples)]
            total = torch.tensor(local, dtype=torch.long, device=device)
            if self.args.world_size > 1:
                total = self.accelerator.reduce(total, reduction="sum")
            self._gere_task_counts = (int(total[0]), int(total[1]))
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._gere_active:
            step = self.state.global_step
            if step != self._gere_last_step:
                self._gere_last_step, self._gere_micro = step, 0
                self._gere_step_counts = self._gere_count_step(step)
            indices = self.gere_schedule.indices(
                step, self._gere_micro, self.args.process_index, self.current_gradient_accumulation_steps
            )
            t0 = time.perf_counter()
            replay = {}
            if indices:
                replay = self.gere_collator.replay_batch(indices)
            elif self.args.world_size > 1 and self.gere_schedule.micro_has_replay(
                    step, self._gere_micro, self.current_gradient_accumulation_steps):
                # Other processes replay in this micro-batch: their forward is a collective (ZeRO-3, FSDP, DDP's
                # buffer broadcast), so this one runs an empty replay forward beside it.
                replay = self.gere_collator.empty_replay_batch()
            inputs = self._gere_with_replay(inputs, replay)
            self._gere_micro += 1
            self.gere_data_seconds += time.perf_counter() - t0
        return super().training_step(model, inputs, num_items_in_batch)

    def _gere_with_replay(self, inputs, replay: dict):
        """The micro-batch with the replay tensors under their reserved keys (a collated task batch is a mapping)."""
        return {**inputs, **replay}

    def _gere_count_step(self, step: int) -> StepCounts:
        """The whole optimizer step over all processes: replay samples and targets (from the schedule), task samples
        and targets (counted when the step's batches were fetched)."""
        start, count = self.gere_schedule.step_range(step)
        lengths = self.gere_store.lengths
        targets = int(sum(int(lengths[self.gere_schedule.sample_at(p)]) - 1 for p in range(start, start + count)))
        if self._gere_task_counts is None:
            raise GeReTrainingError(
                "GeRe counts a step's task samples when the Trainer fetches the step's batches (get_batch_samples); "
                "this training loop fetched them some other way. Use Trainer.train()."
            )
        tasks, task_targets = self._gere_task_counts
        return StepCounts(task_samples=tasks, replay_samples=count, task_targets=task_targets, replay_targets=targets)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        task_inputs, replay = split_replay_inputs(inputs)
        if not self._gere_active or not model.training:
            return super().compute_loss(model, task_inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # The replay forward runs first: under ZeRO-3, TRL's fused LM head (SFTTrainer) reads lm_head.weight outside
        # the module and its backward fails on the re-partitioned weight when a later forward ran lm_head.
        empty_part = None
        if replay.pop("empty", None) is not None:
            # A zero that reaches the forward's graph: its backward is as collective as the other processes' one.
            empty_part = model(input_ids=replay["input_ids"], attention_mask=replay["attention_mask"],
                               use_cache=False).logits.float().sum() * 0.0
            replay = {}
        replay_nll = replay_targets = replay_term = None
        if replay:
            replay_nll, replay_targets, replay_term = self._gere_replay_losses(model, replay)
        task_nll, task_targets, outputs, aux = self._gere_task_losses(model, task_inputs, num_items_in_batch)
        cfg = self.gere_config
        step = replay_step_loss(task_nll, task_targets, self._gere_step_counts, replay_nll, replay_targets, replay_term,
                                share=cfg.replay_share_value, weight=cfg.weight_value, weight_cap=cfg.weight_cap,
                                reduction=cfg.ce_reduction,
                                world_size=self.args.world_size)
        self.gere_last_step_loss = step  # its parts, for diagnostics (benchmarks/grad_shares.py)
        total = step.total
        for extra in (empty_part, aux):
            if extra is not None:
                total = total + extra
        terms = {"task_loss": step.task_ce, "replay_share": torch.tensor(step.share)}
        for name, value in (("replay_ce", step.replay_ce), ("replay_term", step.replay_term),
                            ("replay_weight", step.replay_weight)):
            if value is not None:
                terms[name] = value
        if replay:
            self._gere_samples_seen += int(replay["input_ids"].shape[0])
        total = self._gere_check_finite(total, terms, model)
        self._gere_logged.add(terms)
        return (total, outputs) if return_outputs else total

    def _gere_check_task_loss(self) -> None:
        """What the task loss GeRe computes per sample cannot follow: refused before any work."""
        if getattr(self.args, "label_smoothing_factor", 0) > 0:
            raise GeReConfigError(
                f"label_smoothing_factor={self.args.label_smoothing_factor}: GeRe computes the task loss itself (each "
                "sample's token mean, to weigh samples as the paper's runs do) and has no label smoothing. Set "
                "label_smoothing_factor=0, or loss='none' for plain fine-tuning."
            )
        if self.compute_loss_func is not None:
            raise GeReConfigError(
                "A compute_loss_func was given: GeRe computes the task loss itself (each sample's token mean), so "
                "the function would be ignored. Subclass GeReTrainer and override _gere_task_losses to change the "
                "task loss, or use loss='none'."
            )
        from peft import PeftType

        config = getattr(self.model, "active_peft_config", None) if is_peft_model(self.model) else None
        if config is not None and config.peft_type == PeftType.CPT:
            raise GeReConfigError(
                "PEFT CPT trains with its own loss (its input_type_mask weighs the tokens), which GeRe's per-sample "
                "task CE would replace. Use another PEFT method with GeRe, or loss='none'."
            )

    def _gere_task_losses(self, model, inputs: dict, num_items_in_batch):
        """Per task sample of the micro-batch: summed next-token NLL (differentiable) and target count; the forward's
        outputs; a loss to add as it is (a MoE model's load-balancing loss), or None.

        This class runs the model without labels and takes the NLL from the logits (one upcast, no second loss);
        GeReSFTTrainer takes the per-token log-probs of TRL's fused LM head instead (no logits at all).
        """
        labels = inputs.get("labels")
        if labels is None:
            raise GeReTrainingError(
                f"The task batch has no 'labels' (keys: {sorted(inputs)}). GeRe adds replay to a language-model "
                "loss: use a collator that sets labels, e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)."
            )
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        logits = outputs.logits[:, self._gere_virtual_tokens:]
        nll, targets = token_nll(logits, labels)
        return (*self._gere_per_sample(nll, targets, inputs), outputs, self._gere_aux_loss(outputs))

    def _gere_per_sample(self, values: torch.Tensor, targets: torch.Tensor, inputs: dict):
        """Per-position values and target flags, position t scoring label t + 1 (the last column scoring nothing),
        summed per sample of the task batch."""
        ids, n = sample_ids(inputs)
        target_ids = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-1)[:, : values.shape[1]].to(values.device)
        return (per_sample_sums(values.float(), target_ids, n),
                per_sample_sums(targets.to(torch.float32), target_ids, n))

    def _gere_aux_loss(self, outputs):
        """A MoE model's load-balancing loss (``router_aux_loss_coef · aux_loss``, as the model adds it to its own
        loss), per micro-batch: averaged over the step's micro-batches, as DDP averages it over processes."""
        aux = getattr(outputs, "aux_loss", None)
        if aux is None:
            return None
        coef = getattr(unwrap_causal_lm(self.model).config, "router_aux_loss_coef", 0.0)
        return coef * aux / self.current_gradient_accumulation_steps

    def _gere_replay_losses(self, model, replay: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per replay sample: summed next-token NLL, target count, and the replay term (None for 'ce')."""
        term = self.gere_config.replay_term
        captured = []
        handle = None
        if term is not None and term.reads == "hidden":
            handle = self._gere_norm.register_forward_hook(
                lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
            )
        try:
            # No labels: the per-sample NLL below is the one upcast of the logits (the model's own loss would be a
            # second), and prompt-learning PEFT models would otherwise prepend labels for their virtual tokens.
            outputs = model(input_ids=replay["input_ids"], attention_mask=replay["attention_mask"], use_cache=False)
        finally:
            if handle is not None:
                handle.remove()
        # Prompt tuning / P-tuning prepend virtual tokens: they are no replay text, the store has no state for them.
        skip = self._gere_virtual_tokens
        logits = outputs.logits[:, skip:]
        nll, targets = token_nll(logits, replay["labels"])
        if term is None:
            return nll.sum(dim=1), targets.sum(dim=1), None
        inputs = ReplayTermInputs(hidden=captured[-1][:, skip:] if captured else None, logits=logits, batch=replay,
                                  lower=self._gere_lower, upper=self._gere_upper, config=self.gere_config)
        return nll.sum(dim=1), targets.sum(dim=1), term.compute(inputs)

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

    def log(self, logs, *args, **kwargs):
        if self.gere_config.replay_enabled and self.gere_collator is not None and "loss" in logs:
            logs.update(self._gere_logged.reduced(self, self._gere_samples_seen, self._gere_nonfinite_skipped))
        return super().log(logs, *args, **kwargs)


def _check_launch(args) -> None:
    """Launches GeRe cannot train correctly in, refused before any work."""
    from transformers.training_args import ParallelMode

    if args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        raise GeReConfigError(
            f"This process sees {args.n_gpu} GPUs and no distributed launch, so the Trainer would wrap the model in "
            "torch.nn.DataParallel, which splits each batch across GPUs inside one process. GeRe's replay forward, "
            "its hooks and its per-step replay counts assume one model replica per process. Launch one process per "
            "GPU instead: `accelerate launch train.py` or `torchrun --nproc_per_node N train.py` (or limit this "
            "process to one GPU with CUDA_VISIBLE_DEVICES=0)."
        )


def _zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


class GeReTrainer(GeReMixin, Trainer):
    """`transformers.Trainer` with GeRe replay: the same arguments plus ``gere_config=GeReConfig(...)``.

    With replay on, the model carries the ``gere`` tag (``push_to_hub`` puts it on the card) and the model card
    ``create_model_card`` writes names the method and cites the paper (:mod:`gere_hf.paper`); a ``loss='none'``
    baseline gets the plain Trainer card.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.gere_config.replay_enabled and hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags([GERE_TAGS[0]])

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, **kwargs):
        if not self.gere_config.replay_enabled:
            return super().create_model_card(language=language, license=license, tags=tags, model_name=model_name,
                                             **kwargs)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in GERE_TAGS if t not in tags]
        super().create_model_card(language=language, license=license, tags=tags, model_name=model_name, **kwargs)
        if not self.is_world_process_zero():
            return None
        # Trainer's card (TrainingSummary) has no place for a method or a paper: add TRL's two parts after it.
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as f:
            card = f.read()
        if GERE_ARXIV_ID not in card:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"\n## Method\n\n{method_sentence()}\n\n{citation_markdown()}")
        return None


try:
    from trl import SFTTrainer
except ImportError:  # pragma: no cover - trl is a dependency
    SFTTrainer = None

if SFTTrainer is not None:

    class GeReSFTTrainer(GeReMixin, SFTTrainer):
        """`trl.SFTTrainer` with GeRe replay: the same arguments plus ``gere_config=GeReConfig(...)``.

        Every model card TRL writes for it (at each checkpoint, on ``push_to_hub``, ``create_model_card()``) says it
        was trained with GeRe, links the paper and gives its BibTeX: TRL's ``_BaseTrainer`` reads ``_tag_names``,
        ``_name`` and ``_paper``. A ``loss='none'`` baseline keeps SFTTrainer's card (plain SFT, no GeRe claim).
        """

        _tag_names = [*SFTTrainer._tag_names, GERE_TAGS[0]]
        _name = "GeRe"
        _paper = GERE_PAPER

        def __init__(self, *args, gere_config: GeReConfig | None = None, **kwargs):
            if isinstance(gere_config, GeReConfig) and not gere_config.replay_enabled:
                # Before SFTTrainer.__init__, which tags the model with _tag_names.
                self._tag_names, self._name, self._paper = list(SFTTrainer._tag_names), SFTTrainer._name, {}
            super().__init__(*args, gere_config=gere_config, **kwargs)

        def _gere_task_losses(self, model, inputs: dict, num_items_in_batch):
            """TRL's own step (its fused LM head: per-token log-probs without logits; its entropy, token accuracy and
            token count metrics) with the per-token log-probs read off the forward, summed per sample. TRL's loss
            value is not used: GeRe weighs samples and replay itself."""
            captured = []
            hook = self.model.register_forward_hook(lambda _m, _a, out: captured.append(out))
            try:
                SFTTrainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)
            finally:
                hook.remove()
            outputs = captured[0]
            skip = self._gere_virtual_tokens  # prompt-learning PEFT models score their virtual positions as -100
            log_probs, scored = outputs.log_probs[:, skip:], outputs.label_mask[:, skip:]
            per_token = -log_probs
            if self.args.loss_type == "dft":  # TRL's DFT: each token's NLL weighed by its (detached) probability
                per_token = per_token * log_probs.exp().detach()
            return (*self._gere_per_sample(per_token, scored, inputs), outputs, self._gere_aux_loss(outputs))


__all__ = ["GeReMixin", "GeReTrainer", "GeReSFTTrainer", "GeReTrainingError"]

