"""Experiment tracking of a continual run: every stage is one tracked run of one group, and ``--resume`` goes on
logging into the same runs.

The integrations are transformers' own (``training.report_to``: tensorboard, wandb, trackio, mlflow, ...); this module
only tells each stage's Trainer where and under which name to log, through what those callbacks read:

* ``run_name`` (a TrainingArguments field, :attr:`TrackingConfig.run_name`, default ``{run}-{index}-{stage}``):
  the run's name for W&B, trackio, MLflow, Comet and SwanLab (trackio resumes a run by its name);
* TensorBoard: ``TENSORBOARD_LOGGING_DIR`` = ``<tensorboard_dir>/<index>-<stage>`` (the callback's default lies inside
  the stage's checkpoint folder, which is deleted once the stage is finished);
* W&B: ``WANDB_RUN_GROUP`` (the run group), ``WANDB_RUN_ID`` (made once per stage and kept in ``run_state.json``, so a
  resumed stage logs into the run it started), ``WANDB_RESUME=allow``, ``WANDB_PROJECT`` if set here, ``WANDB_DIR``
  (the run folder, unless set); and ``wandb.finish()`` after every stage, which transformers' WandbCallback never
  calls (every stage of one process would otherwise log into the first stage's run), then ``wandb.teardown()``:
  wandb reads the variables once per process setup, and the next stage must read its own.

The variables are set for the stage only and restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

RUN_NAME_FIELDS = ("run", "index", "stage")
TENSORBOARD_DIR = "tensorboard"


class TrackingError(ValueError):
    """A tracking section that cannot name the runs."""


@dataclass
class TrackingConfig:
    """The ``tracking`` section of a recipe: how each stage's run is named and grouped (``training.report_to`` says
    which integrations log)."""

    group: str | None = field(
        default=None, metadata={"help": "The run group of every stage (W&B's group). Default: the run's name."}
    )
    run_name: str = field(
        default="{run}-{index}-{stage}",
        metadata={"help": "Each stage's run name, a template of {run}, {index} and {stage}."},
    )
    project: str | None = field(
        default=None,
        metadata={"help": "W&B project (WANDB_PROJECT) and trackio project. Default: WANDB_PROJECT, else "
                  "transformers' 'huggingface'."},
    )
    tensorboard_dir: str | None = field(
        default=None,
        metadata={"help": "TensorBoard logs go to <tensorboard_dir>/<index>-<stage>. Default: <output_dir>/tensorboard."},
    )

    def __post_init__(self):
        unknown = sorted(set(re.findall(r"{(\w*)}", self.run_name)) - set(RUN_NAME_FIELDS))
        if unknown:
            raise TrackingError(f"tracking.run_name {self.run_name!r} uses unknown placeholder(s) {unknown}; the "
                                f"placeholders are {', '.join('{' + f + '}' for f in RUN_NAME_FIELDS)}.")
        if "{stage}" not in self.run_name and "{index}" not in self.run_name:
            raise TrackingError(f"tracking.run_name {self.run_name!r} has neither {{stage}} nor {{index}}: every stage "
                                "is its own run and needs its own name. Add {stage}.")

    def stage_run_name(self, run: str, index: int, stage: str) -> str:
        return self.run_name.format(run=run, index=index, stage=stage)


def reporting_to(args) -> list[str]:
    """The integrations a stage's training arguments log to (``report_to`` resolved by TrainingArguments)."""
    value = getattr(args, "report_to", None) or []
    return [value] if isinstance(value, str) else list(value)


def check_integrations(stage_args: list) -> None:
    """Refuse, before any work, a ``report_to`` integration that is not installed: its callback would fail only when
    stage 1's Trainer is built, after the base model's evaluation."""
    from transformers.integrations import get_available_reporting_integrations

    wanted = sorted({name for args in stage_args for name in reporting_to(args)})
    available = set(get_available_reporting_integrations()) | {"kubeflow"}  # kubeflow: added by transformers itself
    missing = [name for name in wanted if name not in available]
    if missing:
        raise TrackingError(
            f"training.report_to asks for {missing}, but {'it is' if len(missing) == 1 else 'they are'} not installed "
            f"here (installed: {sorted(available - {'kubeflow'}) or 'none'}). Install {' and '.join(missing)} "
            "(`pip install gere_hf[tracking]` gives tensorboard and wandb), or remove it from report_to."
        )


def _wandb_run_id(run: str, index: int, stage: str) -> str:
    """A new W&B run id: readable, unique (W&B ids are letters, digits, '-' and '_', unique in a project)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{run}-{index}-{stage}")[:48]
    return f"{stem}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def stage_tracking(config: TrackingConfig, *, run: str, index: int, stage: str, args, record: dict,
                   output_dir: str) -> Iterator[dict]:
    """Around one stage's Trainer (construction and ``train()``): the variables its tracking callbacks read, set for
    the stage and restored afterwards; ends the stage's W&B run.

    ``record`` is the stage's ``tracking`` entry of ``run_state.json``: a W&B run id is made once and kept there (the
    caller saves it before training), and the TensorBoard folder and W&B URL are recorded in it.
    """
    report_to = reporting_to(args)
    env: dict[str, str] = {}
    if "tensorboard" in report_to:
        base = config.tensorboard_dir or os.path.join(output_dir, TENSORBOARD_DIR)
        record["tensorboard_dir"] = os.path.join(os.path.abspath(base), f"{index}-{stage}")
        env["TENSORBOARD_LOGGING_DIR"] = record["tensorboard_dir"]
    users_run = _active_wandb_run()
    if "wandb" in report_to and users_run is not None:
        # A run the caller started (wandb.init before run_recipe): the callback logs into it, and it is not ours to end.
        logger.warning("A W&B run (%s) is active: stage %d (%s) logs into it rather than into a run of its own, and it "
                       "is left open.", getattr(users_run, "id", "?"), index, stage)
        report_to = [name for name in report_to if name != "wandb"]
    elif "wandb" in report_to:
        record.setdefault("wandb_run_id", _wandb_run_id(run, index, stage))
        record["wandb_group"] = config.group or run
        env.update(WANDB_RUN_ID=record["wandb_run_id"], WANDB_RUN_GROUP=record["wandb_group"], WANDB_RESUME="allow")
        if config.project:
            env["WANDB_PROJECT"] = config.project
        if not os.environ.get("WANDB_DIR"):
            env["WANDB_DIR"] = output_dir
    if reporting_to(args):
        record["run_name"] = config.stage_run_name(run, index, stage)
        record["report_to"] = reporting_to(args)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    failed = False
    try:
        yield record
    except BaseException:
        failed = True
        raise
    finally:
        try:
            if "wandb" in report_to:
                _finish_wandb(record, exit_code=1 if failed else 0)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _active_wandb_run():
    import sys

    wandb = sys.modules.get("wandb")
    return None if wandb is None else getattr(wandb, "run", None)


def _finish_wandb(record: dict, exit_code: int = 0) -> None:
    """End the stage's W&B run (the next stage's Trainer would otherwise reuse it), keeping its URL; a stage that
    failed ends its run as failed (``--resume`` continues it)."""
    import sys

    wandb = sys.modules.get("wandb")  # imported by the callback if it ran; nothing to finish otherwise
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    url = getattr(wandb.run, "url", None)
    if url:
        record["wandb_url"] = url
    wandb.finish(exit_code=exit_code)
    # wandb reads WANDB_* once, into a process-wide singleton, at its first setup: without a teardown the next
    # stage's run would take this stage's run id and group from it (seen with wandb 0.31), whatever the environment.
    wandb.teardown()


__all__ = ["TrackingConfig", "TrackingError", "check_integrations", "stage_tracking"]
