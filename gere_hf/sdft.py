"""GeRe replay beside TRL's self-distillation fine-tuning (SDFT, arXiv 2601.19897): `GeReSDFTTrainer`.

SDFT changes what a task is learned from: the student generates its own completions of a prompt, and the loss pulls
its next-token distributions towards those of a teacher (the model as it was, or an average of it) that sees a
demonstration of the answer (the *privileged context*). GeRe constrains what the model does on general text. The two
combine: the replay samples come through the same schedule and the same step loss as with SFT (every sample counts
once: a rollout is a task sample), the task part is SDFT's own per-sample distillation loss.

What SDFT needs besides the prompt is the privileged context. For prompt–completion tasks (every built-in and recipe
task) :func:`sdft_dataset` makes it a worked example of the same question, and :data:`DEFAULT_TEACHER_TEMPLATE` puts
it before the prompt, so the teacher reads the answer and then the question it answers:

    Here is a question with its answer:
    What is 37 + 45?
    Answer: 82

    What is 37 + 45?
    Answer:

The teacher (``teacher_model_kind``: ``base``, the model at the start of the stage, or ``ema``) then assigns the
answer high probability, and the student, which does not see it, is distilled towards that. docs/sdft.md says more.
"""

from __future__ import annotations

import datasets
import torch

from .config import GeReConfigError
from .trainer import GeReMixin

try:  # TRL's experimental trainers are imported only here: the rest of gere_hf needs none of them
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer
except ImportError:  # pragma: no cover - trl is a dependency, but its experimental modules move between releases
    SDFTConfig = SDFTTrainer = None

DEFAULT_TEACHER_TEMPLATE = "Here is a question with its answer:\n{privileged_context}\n\n{prompt}"
"""``SDFTConfig.teacher_prompt_template`` for prompt–completion tasks: the worked example first, then the prompt."""

__all__ = ["DEFAULT_TEACHER_TEMPLATE", "GeReSDFTTrainer", "SDFTConfig", "sdft_dataset"]


def sdft_dataset(task_train: datasets.Dataset) -> datasets.Dataset:
    """A prompt–completion dataset as SDFT reads it: ``prompt``, and ``privileged_context`` = the same prompt with its
    completion (the demonstration the teacher sees)."""
    missing = {"prompt", "completion"} - set(task_train.column_names)
    if missing:
        raise GeReConfigError(f"SDFT builds its teacher's context from 'prompt' and 'completion'; the dataset lacks "
                              f"{sorted(missing)}.")
    return task_train.map(lambda row: {"prompt": row["prompt"],
                                       "privileged_context": row["prompt"] + row["completion"]},
                          remove_columns=[c for c in task_train.column_names if c != "prompt"])


if SDFTTrainer is not None:

    class GeReSDFTTrainer(GeReMixin, SDFTTrainer):
        """`trl.experimental.sdft.SDFTTrainer` with GeRe replay: the same arguments plus
        ``gere_config=GeReConfig(...)``; with ``loss='none'`` it trains exactly like ``SDFTTrainer``.

        A step's task samples are its rollouts (each micro-batch holds ``per_device_train_batch_size`` of them); the
        task part of the step loss is SDFT's per-sample distillation loss, so the default weighting counts every
        rollout and every replay sample once (``ce_reduction='sample_mean'``; ``token_mean`` is refused: SDFT
        already averages each rollout's tokens).
        """

        _tag_names = [*SDFTTrainer._tag_names, "gere"]

        def __init__(self, *args, gere_config=None, **kwargs):
            super().__init__(*args, gere_config=gere_config, **kwargs)
            if self.gere_config.replay_enabled and self.gere_config.ce_reduction != "sample_mean":
                raise GeReConfigError(
                    "GeReSDFTTrainer weighs SDFT's per-rollout loss against the replay samples per sample: "
                    "ce_reduction must be 'sample_mean' (SDFT averages each rollout's tokens itself)."
                )
            self._gere_pending_replay: dict = {}

        def _gere_with_replay(self, inputs, replay: dict):
            # SDFT's micro-batch is a list of prompts until _prepare_inputs generates its rollouts: the replay
            # tensors wait for that, then join the prepared batch.
            self._gere_pending_replay = replay
            return inputs

        def _prepare_inputs(self, inputs):
            batch = super()._prepare_inputs(inputs)
            if self.model.training and self._gere_pending_replay:
                batch = {**batch, **self._gere_pending_replay}
                self._gere_pending_replay = {}
            return batch

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            if self._gere_active:
                # Rollouts: SDFT's dataloader yields prompts for several steps' generation at once, and every
                # micro-batch trains per_device_train_batch_size rollouts of them.
                rollouts = self.args.per_device_train_batch_size * num_batches * self.args.world_size
                self._gere_task_counts = (rollouts, 0)
            return batch_samples, num_items

        def _gere_task_losses(self, model, inputs: dict, num_items_in_batch):
            """SDFT's loss of the micro-batch is the mean of its rollouts' losses (each a token mean): as per-sample
            values, that mean for every rollout sums to their sum, which is all the step loss reads."""
            loss = SDFTTrainer.compute_loss(self, model, inputs) * self.current_gradient_accumulation_steps
            rollouts = int(inputs["completion_ids"].shape[0])
            ones = torch.ones(rollouts, device=loss.device)
            return loss * ones, ones, None, None

else:  # pragma: no cover
    GeReSDFTTrainer = None
