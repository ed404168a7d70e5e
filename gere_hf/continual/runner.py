"""The recipe runner: checks, then row 0, then each stage (train, save, evaluate, push), then the report.

Stage t starts from what stage t−1 saved (:mod:`gere_hf.continual.adapters`); the reference store is built once
from the base model at stage 1 and reused by every stage. Every stage writes ``output_dir/stages/<t>-<name>/``
(adapter or full weights, tokenizer, trainer state, ``metrics.json``, a model card); the run folder's state
(:mod:`gere_hf.continual.state`) lets ``--resume`` go on after the last finished stage. The accuracy matrix is
filled before stage 1 and after every stage (:mod:`gere_hf.evaluation`); the report is written at the end. Every check
that can fail on bad input (unknown keys, datasets and their fields, DeepSpeed configs, Hub access, ``--resume``
against another recipe or changed files, the model's module names and positions, what survives ``max_length``, too
little evaluation data) runs before anything is written (:mod:`gere_hf.continual.preflight`). The run folder is locked
while the run lives (:mod:`gere_hf.locks`): a second run, or a ``--resume`` beside a live run, is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence

from ..distributed import barrier
from ..evaluation.evaluator import ContinualEvaluator
from ..evaluation.report import write_report
from ..fileio import write_json
from ..locks import folder_lock
from ..models import BUILTIN_MODELS, resolve_model_path, tiny_llama
from ..reference import ReferenceStore, ReferenceStoreMismatch, check_base_weights, model_weights_hash, read_manifest
from ..replay import ReplaySet
from . import adapters as adapters_mod
from . import data, launch, methods, preflight
from . import state as run_state
from .hub import HubTarget, hub_preflight, model_card, push_stage
from .recipe import TINY_MODEL, Recipe, RecipeError, apply_overrides, load_recipe, parse_recipe
from .state import BASE_MODEL_DIR, CHECKPOINTS_DIR, METRICS_FILE, RUN_STATE_FILE, STAGES_DIR
from .tracking import TrackingError, check_integrations, stage_tracking

logger = logging.getLogger(__name__)

# Hub ids of the built-in models, for the model card's base_model metadata.
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class RecipeRunner:
    """Runs a :class:`~gere_hf.continual.recipe.Recipe`.

    Args:
        recipe: the recipe.
        resume: continue the run in ``recipe.output_dir`` (same recipe) after its last finished stage.
        on_stage_end: optional ``callback(index, trainer)`` on every rank after stage ``index`` is trained and saved,
            before the trainer is freed (tests compare the trained model with the one rebuilt from disk).
    """

    def __init__(self, recipe: Recipe, resume: bool = False, on_stage_end: Callable | None = None):
        self.recipe = recipe
        self.resume = resume
        self.on_stage_end = on_stage_end
        self.output_dir = os.path.abspath(recipe.output_dir)
        self.state: dict = {}
        self.tasks: list = []
        self.stage_args: list = []
        self.launch_type = None  # the launch's own accelerate distributed type (build_training_args)
        self.hub: HubTarget | None = None
        self.evaluator = None
        self.tokenizer = None
        self.replay = None
        self.replay_texts: list[str] | None = None
        self.general_selection = None
        self.mmlu = None
        self.base_path: str = ""
        self._log_history: dict[int, list] = {}
        self.clear = run_state.CLEAR_NOTHING  # what a fresh start removes first (check_previous_run)
        self.facts: preflight.ModelFacts | None = None
        self.examples: list[dict] = []
        self.stage_methods: list[dict] = []  # each stage's training method and its options as trained

    # -- the whole run --------------------------------------------------------------------------------------------------

    def run(self) -> dict | None:
        """Run the recipe; returns the results (on the main process; None elsewhere or without evaluation)."""
        r = self.recipe
        t0 = time.time()
        with contextlib.ExitStack() as held:
            self.check_inputs(held)
            self.prepare()
            for index in range(1, len(r.stages) + 1):
                if self._finished(index):
                    logger.info("Stage %d (%s) is finished; skipping it.", index, r.stages[index - 1].name)
                    self.remove_checkpoints(index)  # a run killed while it removed them left some
                    continue
                self.train_stage(index)
                self.finish_stage(index)
                self.push_pending()
            self.push_pending()
            self.write_report()
            self.state["finished"] = True
            self.state["seconds"] = round(time.time() - t0, 2)
            self.save_state()
            barrier()
        logger.info("The run is finished: %s", self.output_dir)
        return self.results() if self.is_main else None

    def check_inputs(self, held: contextlib.ExitStack | None = None) -> None:
        """Everything that can fail on bad input, before anything heavy or written. ``held`` keeps the run folder's
        lock until the run ends."""
        r = self.recipe
        if r.training.get("deepspeed"):
            r.training["deepspeed"] = launch.check_deepspeed_config(r.training["deepspeed"], r)
        self.build_training_args()  # sets up the process group: the lock's outcome reaches every rank through it
        try:
            adapters_mod.check_launch(r.peft, launch.sharded_launch(r, self.stage_args[0]))
        except adapters_mod.AdapterError as err:
            raise RecipeError(str(err)) from None
        if held is not None:
            launch.on_main_process(lambda: held.enter_context(
                folder_lock(self.output_dir, "gere-hf run", wait=False, remove_if_empty=True)))
        self.check_previous_run()
        if r.hub.push:
            self.hub = hub_preflight(r.hub, r.run_name, [s.name for s in r.stages])
        if r.evaluation.lm_eval_tasks and launch.zero3_config(r.training.get("deepspeed")):
            raise RecipeError("evaluation.lm_eval_tasks is not supported under ZeRO-3 (lm-eval runs on the main "
                              "process only); drop it or use ZeRO-2.")
        try:
            check_integrations(self.stage_args)
        except TrackingError as err:
            raise RecipeError(str(err)) from None
        self.check_model()
        # The replay texts first: the tasks' eval examples and then the held-out general texts are chosen disjoint
        # from them (and the general texts from the tasks), all before anything is written.
        self.check_replay()
        preflight.check_replay_per_step(r, self.replay_texts)
        self.load_tasks()
        self.stage_methods = methods.prepare_stages(r.method, r.stages, self.tasks, self.stage_args,
                                                    self.facts.tokenizer)
        self.examples = preflight.check_examples_kept(r, self.tasks, self.facts.tokenizer, self.stage_args)
        self.select_general_texts()
        self.select_mmlu()
        if r.gere.replay_enabled or r.gere.store_dir:
            preflight.check_store_dir(self.store_dir, "gere.store_dir" if r.gere.store_dir else
                                      "the store folder (output_dir/gere_store)")

    def check_model(self) -> None:
        """The base model's config, module names and tokenizer against the recipe; on ``--resume``, the base model's
        files and the finished stages' saved weights against the run's record of them."""
        r = self.recipe
        self.resolve_base_path()
        self.facts = preflight.model_facts(r, self.base_path)
        if r.peft is not None:
            preflight.check_target_modules(r.peft.get("target_modules"), self.facts, r.model.name_or_path)
        preflight.check_lengths(r, self.facts)
        if not self.state:
            return
        changed = run_state.base_weights_changes(self.base_path, (self.state.get("model") or {}).get("weights"))
        if changed:
            raise RecipeError(
                f"--resume: {changed}. The finished stages and the reference store were made from the old weights: "
                "put them back, or start a new run (another output_dir, or overwrite_output_dir: true)."
            )
        for index in range(1, len(r.stages) + 1):
            entry = self._stage_entry(index)
            problem = None
            if entry.get("status") == "finished":
                problem = run_state.stage_files_problem(self.stage_dir(index), entry.get("files"))
            if problem:
                raise RecipeError(
                    f"--resume: stage {index} ({entry['name']}) in {self.stage_dir(index)} is not what the run saved "
                    f"({problem}): it was truncated, altered or replaced. Restore the stage folder from a copy, or "
                    "start the run over (overwrite_output_dir: true)."
                )

    def prepare(self) -> None:
        """The run folder, the base model and tokenizer, the replay set, run_state.json and row 0."""
        r = self.recipe
        fresh = not self.state
        if fresh:
            if self.is_main:
                os.makedirs(self.output_dir, exist_ok=True)
                if self.clear is not run_state.CLEAR_NOTHING:  # an overwrite_output_dir start, or a never-trained run
                    own_store = self.clear == run_state.CLEAR_ALL and not r.gere.store_dir
                    run_state.clear_previous_outputs(self.output_dir, self.store_dir if own_store else None)
            barrier()
        self.prepare_base_model()
        self.tokenizer = adapters_mod.load_tokenizer(self.base_path, r.model.trust_remote_code)
        if r.gere.replay_enabled:
            g = r.gere
            self.replay = ReplaySet.from_texts(self.replay_texts, self.tokenizer, g.replay_max_length,
                                               source=str(g.replay_source), seed=g.replay_seed)
        # run_state.json is written once the inputs are known good: a run refused for its tokenizer or replay texts
        # leaves no state behind that a second attempt would have to --resume or overwrite.
        if fresh:
            weights = run_state.base_weights_record(self.base_path) if self.is_main else None
            self.state = run_state.fresh_run_state(r, self.output_dir, self.base_path,
                                                   [self.stage_dir(i) for i in range(1, len(r.stages) + 1)], weights)
        self.state["world_size"] = self.world_size
        self.save_state()
        if r.evaluation.enabled and self.is_main:
            self.evaluator = self.make_evaluator()
            for _, record in sorted(self.state.get("evaluation", {}).items(), key=lambda kv: int(kv[0])):
                self.evaluator.restore_row(record)
        if "0" not in self.state.get("evaluation", {}):
            self.evaluate_row(0)
        barrier()

    # -- paths ----------------------------------------------------------------------------------------------------------

    def stage_dir(self, index: int) -> str:
        return os.path.join(self.output_dir, STAGES_DIR, f"{index}-{self.recipe.stages[index - 1].name}")

    @property
    def store_dir(self) -> str:
        return os.path.abspath(self.recipe.gere.store_dir or os.path.join(self.output_dir, "gere_store"))

    @property
    def is_main(self) -> bool:
        return self.stage_args[0].process_index == 0 if self.stage_args else int(os.environ.get("RANK", "0")) == 0

    @property
    def world_size(self) -> int:
        return self.stage_args[0].world_size if self.stage_args else int(os.environ.get("WORLD_SIZE", "1"))

    # -- checks and data, before any training ---------------------------------------------------------------------------

    def check_previous_run(self) -> None:
        """``--resume`` needs the same recipe; a fresh run refuses to overwrite a run unless told to."""
        self.state, self.clear = run_state.check_previous_run(self.recipe, self.output_dir, self.resume)

    def build_training_args(self) -> None:
        self.stage_args = launch.build_stage_args(
            self.recipe, [os.path.join(self.stage_dir(i), CHECKPOINTS_DIR) for i in range(1, len(self.recipe.stages) + 1)]
        )
        self.launch_type = launch.launch_distributed_type()

    def check_replay(self) -> None:
        self.replay_texts = data.load_run_replay_texts(self.recipe)

    def load_tasks(self) -> None:
        self.tasks = data.load_stage_tasks(self.recipe, self.replay_texts)

    def select_general_texts(self):
        self.general_selection = data.select_general_texts(self.recipe, self.replay_texts, self.tasks)
        return self.general_selection

    def select_mmlu(self):
        self.mmlu = data.select_mmlu(self.recipe, self.replay_texts, self.tasks)
        return self.mmlu

    def data_overlap(self) -> dict:
        """What keeps the evaluation data apart from the replay texts, with the numbers used (``results.json``)."""
        return data.describe_data_overlap(self.recipe, self.replay_texts, self.tasks, self.general_selection,
                                          self.mmlu)

    # -- models ---------------------------------------------------------------------------------------------------------

    def _load(self, path: str):
        m = self.recipe.model
        return adapters_mod.load_causal_lm(path, m.dtype, m.trust_remote_code)

    def resolve_base_path(self) -> None:
        """The base model's path, written nowhere in the run folder: a built-in model is converted once into the
        cache (by one process); the tiny random Llama's path is its folder in the run (saved by prepare_base_model)."""
        name = self.recipe.model.name_or_path
        if name == TINY_MODEL:
            self.base_path = os.path.join(self.output_dir, BASE_MODEL_DIR)
            return
        if name in BUILTIN_MODELS:
            if self.is_main:
                resolve_model_path(name)  # converted once, by one process
            barrier()
            self.base_path = resolve_model_path(name)
        else:
            local = data.resolve_recipe_path(name, self.recipe)
            self.base_path = local if local is not None and os.path.isdir(local) else name

    def prepare_base_model(self) -> None:
        """The base model's path; the built-in tiny random Llama is saved once into the run folder (main process)."""
        if not self.base_path:
            self.resolve_base_path()
        if self.recipe.model.name_or_path != TINY_MODEL:
            return
        if self.is_main and not os.path.isfile(os.path.join(self.base_path, "config.json")):
            from transformers import ByT5Tokenizer

            tmp = self.base_path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tiny_llama(seed=self.recipe.seed).save_pretrained(tmp)
            ByT5Tokenizer().save_pretrained(tmp)
            os.replace(tmp, self.base_path)
        barrier()

    def _stage_dirs(self, upto: int) -> list[str]:
        return [self.stage_dir(i) for i in range(1, upto + 1)]

    def load_result_model(self, index: int):
        """The model after stage ``index`` (0: the base), rebuilt from disk as full weights, for evaluation."""
        with adapters_mod.zero3_hidden():
            return adapters_mod.stage_result_model(
                self._load, self.base_path, self._stage_dirs(index), self.recipe.peft, self.recipe.strategy
            )

    # -- evaluation (one place: row 0, every stage, the report) ---------------------------------------------------------

    def make_evaluator(self):
        ev = self.recipe.evaluation
        selection = self.general_selection if self.general_selection is not None else self.select_general_texts()
        general = selection.texts if selection is not None else None
        return ContinualEvaluator(
            self.tasks, general, stage_names=["base"] + [s.name for s in self.recipe.stages],
            label=self.recipe.run_name, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
            general_max_length=ev.general_max_length, general_batch_size=ev.general_batch_size,
            lm_eval_task_names=ev.lm_eval_tasks or None, lm_eval_limit=ev.lm_eval_limit,
            mmlu=self.mmlu if self.mmlu is not None else self.select_mmlu(), progress=sys.stderr.isatty(),
        )

    def evaluate_row(self, row: int) -> dict | None:
        """Evaluate the model after stage ``row`` (0: base) on the main process; store the row in run_state."""
        if self.evaluator is None or not self.is_main:
            return None
        model = self.load_result_model(row).to(self.stage_args[0].device)
        with adapters_mod.zero3_hidden():  # the other ranks wait at a barrier: no collective may run here
            record = self.evaluator.evaluate(model, self.tokenizer, row)
        del model
        launch.free_memory()
        self.state.setdefault("evaluation", {})[str(row)] = record
        self.save_state()
        return record

    def results(self) -> dict | None:
        if self.evaluator is None:
            return None
        results = self.evaluator.results()
        results["run"] = {
            "name": self.recipe.run_name,
            "recipe": self.recipe.path,
            "recipe_hash": self.recipe.recipe_hash,
            "model": self.recipe.model.name_or_path,
            "method": adapters_mod.method_name(self.recipe.peft, self.recipe.strategy),
            "training_method": self.recipe.method.to_dict(),
            "gere": self.recipe.gere.to_dict(),
            "world_size": self.world_size,
            "stages": [{k: s.get(k) for k in ("index", "name", "dir", "distributed_type", "train", "examples", "hub",
                                              "tracking")}
                       for s in self.state["stages"]],
        }
        results["data_overlap"] = self.data_overlap()
        return results

    def write_report(self) -> None:
        results = self.results()
        if results is not None and self.is_main:
            write_report(self.output_dir, results)

    # -- run state ------------------------------------------------------------------------------------------------------

    def save_state(self) -> None:
        if self.is_main:
            self.state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            write_json(os.path.join(self.output_dir, RUN_STATE_FILE), self.state)

    def _stage_entry(self, index: int) -> dict:
        return self.state["stages"][index - 1]

    def _finished(self, index: int) -> bool:
        return self._stage_entry(index).get("status") == "finished"

    # -- stages ---------------------------------------------------------------------------------------------------------

    def _check_store_base(self, model) -> None:
        """A store left at store_dir by another base model would be reused silently ('base' stores skip the weights
        check after stage 1): at stage 1 the model is the base, so compare now."""
        manifest = read_manifest(self.store_dir)
        if self.recipe.gere.reference != "base" or self.recipe.gere.rebuild_store or manifest is None:
            return
        stored = manifest.get("fingerprint", {})
        if stored.get("model_weights") is None:
            return
        try:
            check_base_weights(self.store_dir, stored, model_weights_hash(model), peft=False, is_base=True)
        except ReferenceStoreMismatch:
            raise RecipeError(
                f"The reference store at {self.store_dir} was built from other base-model weights than "
                f"{self.recipe.model.name_or_path}. Point gere.store_dir elsewhere, delete the store, or set "
                "gere.rebuild_store: true."
            ) from None

    def _base_store(self, index: int):
        """The 'base' store for stage ``index`` > 1, opened here: stage 1 built or checked it against the base model,
        and later stages' weights differ from it by design (full fine-tuning, adapters merged by 'stack'), which the
        trainer would otherwise question. None where the trainer opens or builds it itself."""
        if index == 1 or not self.recipe.gere.replay_enabled or self.recipe.gere.reference != "base":
            return None
        return ReferenceStore.open_distributed(self.store_dir, verify=False)  # nodes that lack it get rank 0's copy

    def train_stage(self, index: int) -> None:
        from transformers import set_seed

        r = self.recipe
        stage, task, args = r.stages[index - 1], self.tasks[index - 1], self.stage_args[index - 1]
        stage_dir = self.stage_dir(index)
        entry = self._stage_entry(index)
        checkpoint = None
        if self.resume and os.path.isdir(args.output_dir):
            checkpoint = run_state.last_complete_checkpoint(args.output_dir)
        entry.setdefault("examples", {}).update(self.examples[index - 1] if self.examples else {})
        if run_state.final_checkpoint(checkpoint):
            self.adopt_final_checkpoint(index, checkpoint)
            return
        logger.info("Stage %d/%d (%s): %d training examples%s", index, len(r.stages), stage.name, len(task.train),
                    f", resuming from {checkpoint}" if checkpoint else "")
        if getattr(args, "hf_deepspeed_config", None) is not None:
            from transformers.integrations.deepspeed import set_hf_deepspeed_config

            set_hf_deepspeed_config(args.hf_deepspeed_config)  # this stage's config decides ZeRO-3 loading
        set_seed(r.seed + index)  # the same fresh LoRA weights on every rank
        model = adapters_mod.training_model(self._load, self.base_path, self._stage_dirs(index - 1),
                                            r.stage_peft(index), r.strategy)
        if index == 1:
            self._check_store_base(model)
        entry["status"] = "running"
        # rebuild_store asks for a fresh store from the base model: at stage 1 only, never from a fine-tuned model.
        gere_config = dataclasses.replace(r.gere, store_dir=self.store_dir,
                                          rebuild_store=r.gere.rebuild_store and index == 1 and checkpoint is None)
        # The stage's tracked run (report_to): its name, group and folder; a W&B run id made now is kept in
        # run_state.json (saved before training), so --resume logs into the same run.
        with stage_tracking(r.tracking, run=r.run_name, index=index, stage=stage.name, args=args,
                            record=entry.setdefault("tracking", {}), output_dir=self.output_dir):
            self.save_state()
            trainer = r.method.trainer_class()(  # GeReSFTTrainer, or the method's (methods.METHODS)
                model=model, args=args, train_dataset=r.method.train_dataset(task.train), processing_class=self.tokenizer,
                gere_config=gere_config, replay_set=self.replay, reference_states=self._base_store(index),
            )
            entry["distributed_type"] = str(getattr(trainer.accelerator.distributed_type, "value",
                                                    trainer.accelerator.distributed_type))
            entry["method"] = {**self.stage_methods[index - 1], "trainer": type(trainer).__name__}
            entry["examples"]["trained"] = len(trainer.train_dataset)  # what TRL kept (max_length drops some)
            if args.fsdp and entry["distributed_type"] != "FSDP":
                logger.warning("training.fsdp is set but accelerate runs %s: it enables FSDP only on "
                               "GPUs/accelerators.", entry["distributed_type"])
            launch.check_fsdp_saves_full_weights(trainer.accelerator.state)
            start = time.time()
            output = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model(stage_dir)  # every rank: ZeRO-3 gathers the weights; the main process writes
        if self.is_main:
            trainer.state.save_to_json(os.path.join(stage_dir, "trainer_state.json"))
        if self.on_stage_end is not None:
            self.on_stage_end(index, trainer)
        entry["train"] = {k: v for k, v in output.metrics.items() if isinstance(v, (int, float))}
        entry["train"]["global_step"] = trainer.state.global_step
        entry["train_seconds"] = round(time.time() - start, 2)
        self._log_history[index] = trainer.state.log_history
        trainer.accelerator.free_memory()
        del trainer, model
        launch.reset_accelerator_state(self.launch_type)
        launch.free_memory()
        barrier()

    def adopt_final_checkpoint(self, index: int, checkpoint: str) -> None:
        """A complete checkpoint at the stage's last step is the trained stage: its saved model becomes the stage's
        (byte for byte what save_model would write), with the checkpoint's trainer state, without training."""
        stage_dir = self.stage_dir(index)
        entry = self._stage_entry(index)
        logger.info("Stage %d (%s): %s is the stage's last step; taking its model as the stage's result.", index,
                    self.recipe.stages[index - 1].name, checkpoint)
        if self.is_main:
            state = run_state.adopt_checkpoint(checkpoint, stage_dir)
            summary = {"epoch": state.get("epoch"), "step": state.get("global_step"),
                       "total_flos": state.get("total_flos"), "finished_from_checkpoint": os.path.basename(checkpoint)}
            state["log_history"] = [*state.get("log_history", []), summary]
            write_json(os.path.join(stage_dir, "trainer_state.json"), state)
            entry["train"] = {"global_step": state.get("global_step"), "epoch": state.get("epoch"),
                              "total_flos": state.get("total_flos")}
            self._log_history[index] = state["log_history"]
        entry["status"] = "running"
        self.save_state()
        barrier()

    def finish_stage(self, index: int) -> None:
        """After training: evaluate, write metrics and the model card, mark the stage finished (main process)."""
        r = self.recipe
        stage_dir = self.stage_dir(index)
        record = self.evaluate_row(index)
        entry = self._stage_entry(index)
        if self.is_main:
            task = self.tasks[index - 1]
            metrics = {
                "stage": index, "name": r.stages[index - 1].name, "task": task.describe(),
                "method": adapters_mod.method_name(r.peft, r.strategy), "gere": r.gere.to_dict(),
                "training_method": entry.get("method"),
                "train": entry.get("train"), "train_seconds": entry.get("train_seconds"),
                "evaluation": record, "log_history": self._log_history.pop(index, []),
            }
            write_json(os.path.join(stage_dir, METRICS_FILE), metrics)
            with open(os.path.join(stage_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(self._model_card(index, record, entry.get("train") or {}, entry.get("tracking")))
            entry["files"] = run_state.stage_files_record(stage_dir)  # what eval --run and --resume check it against
            entry["status"] = "finished"
            if record is not None:
                entry["accuracy"] = record.get("accuracy")
                entry["general"] = record.get("general")
            self.save_state()
            self.remove_checkpoints(index)
        barrier()

    def remove_checkpoints(self, index: int) -> None:
        """A finished stage's result is saved: its checkpoints (optimizer states) are not needed (main process)."""
        checkpoints = os.path.join(self.stage_dir(index), CHECKPOINTS_DIR)
        if self.is_main and not self.recipe.keep_checkpoints and os.path.isdir(checkpoints):
            shutil.rmtree(checkpoints)

    def _model_card(self, index: int, record: dict | None, train: dict, tracking: dict | None = None) -> str:
        r = self.recipe
        name = r.model.name_or_path
        hub_id = BUILTIN_HUB_IDS.get(name)
        if hub_id is None and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name):
            hub_id = name
        keep = ("train_loss", "train_runtime", "global_step", "epoch")
        return model_card(
            run=r.run_name, base_model=name, base_model_hub_id=hub_id, index=index, num_stages=len(r.stages),
            stage=r.stages[index - 1].name, task=self.tasks[index - 1].describe(), stages=[s.name for s in r.stages],
            gere=r.gere.to_dict(), method=adapters_mod.method_name(r.peft, r.strategy),
            metrics={"train": {k: v for k, v in train.items() if k in keep},
                     "accuracy": (record or {}).get("accuracy"), "general": (record or {}).get("general")},
            tracking=tracking,
        )

    def push_pending(self) -> None:
        """Push finished stages not pushed yet (main process); a failed push stops the run, the stage stays saved."""
        if self.hub is None:
            return
        if self.is_main:
            for index in range(1, len(self.recipe.stages) + 1):
                entry = self._stage_entry(index)
                if entry.get("status") == "finished" and not entry.get("hub"):
                    entry["hub"] = push_stage(self.hub, self.stage_dir(index), index, entry["name"])
                    self.save_state()
        barrier()


def run_recipe(
    recipe: str | dict | Recipe,
    resume: bool = False,
    overrides: Sequence[str] = (),
    on_stage_end: Callable | None = None,
) -> dict | None:
    """Run a continual recipe (a YAML path, a mapping or a :class:`Recipe`); returns the results on the main process.

    This is what ``gere-hf run RECIPE [--resume] [--set key=value ...]`` calls.
    """
    if isinstance(recipe, Recipe):
        if overrides:
            recipe = parse_recipe(apply_overrides(recipe.raw, overrides), path=recipe.path)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(apply_overrides(recipe, overrides))
    else:
        recipe = load_recipe(os.fspath(recipe), overrides)
    return RecipeRunner(recipe, resume=resume, on_stage_end=on_stage_end).run()


__all__ = ["RecipeRunner", "run_recipe"]
