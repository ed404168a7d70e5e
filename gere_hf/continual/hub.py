"""Pushing the stages of a continual run to the Hugging Face Hub, and the model card each stage carries.

Each finished stage is pushed either as its own repository (``layout: repos``, id template ``{user}/{run}-{stage}``)
or as a branch of one repository (``layout: revisions``, ``{user}/{run}`` at revision ``stage-{index}-{stage}``).
:func:`hub_preflight` checks the token and the endpoint (``whoami``) before any training starts, so a run that could
not push fails in seconds rather than after the first stage.

The token is read from the environment (``hub.token_env``, default ``HF_TOKEN``) or huggingface_hub's saved login,
never from the recipe: recipes, ``run_state.json``, ``results.json``, model cards and our log lines never hold it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..paper import GERE_TAGS, citation_markdown, method_sentence

logger = logging.getLogger(__name__)

LAYOUTS = ("repos", "revisions")
DEFAULT_REPO_TEMPLATES = {"repos": "{user}/{run}-{stage}", "revisions": "{user}/{run}"}
TEMPLATE_FIELDS = ("user", "run", "stage", "index")
# What a stage folder holds that does not belong on the Hub: the in-stage Trainer checkpoints (optimizer states).
IGNORED_DIRS = ("checkpoints",)
# Trainer.save_model's pickle of the TrainingArguments: loading it from the Hub would run code (torch.load without
# weights_only), and the stage's settings are in metrics.json and the model card.
IGNORED_FILES = ("training_args.bin",)


class HubError(RuntimeError):
    """The Hub cannot be used as the recipe asks (no token, no network, a bad repository name, a failed push)."""


@dataclass
class HubConfig:
    """The ``hub`` section of a recipe: where finished stages are pushed."""

    push: bool = field(default=False, metadata={"help": "Push every finished stage (adapter or weights + model card)."})
    layout: str = field(
        default="repos",
        metadata={"help": "'repos': one repository per stage; 'revisions': one repository, one branch per stage."},
    )
    repo_id: str | None = field(
        default=None,
        metadata={"help": "Repository id template with {user}, {run}, {stage}, {index}. Default: '{user}/{run}-{stage}' "
                  "(repos) or '{user}/{run}' (revisions)."},
    )
    revision: str = field(
        default="stage-{index}-{stage}",
        metadata={"help": "Branch name template of the 'revisions' layout ({run}, {stage}, {index}, {user})."},
    )
    private: bool = field(default=True, metadata={"help": "Create the repositories as private."})
    endpoint: str | None = field(
        default=None, metadata={"help": "Hub endpoint. Default: $HF_ENDPOINT, else https://huggingface.co."}
    )
    token_env: str = field(
        default="HF_TOKEN",
        metadata={"help": "Environment variable holding the token (never put a token in a recipe). Falls back to the "
                  "token saved by `hf auth login`."},
    )

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise HubError(f"Unknown hub.layout {self.layout!r}; choose 'repos' or 'revisions'.")
        for name in ("repo_id", "revision"):
            template = getattr(self, name)
            if template is None:
                continue
            unknown = sorted(set(re.findall(r"{(\w*)}", template)) - set(TEMPLATE_FIELDS))
            if unknown:
                raise HubError(
                    f"hub.{name} {template!r} uses unknown placeholder(s) {unknown}; the placeholders are "
                    f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}."
                )
        if self.layout == "repos" and self.repo_id is not None and "{stage}" not in self.repo_id \
                and "{index}" not in self.repo_id:
            raise HubError(
                f"hub.repo_id {self.repo_id!r} has neither {{stage}} nor {{index}}: with layout 'repos' every stage "
                "needs its own repository. Add {stage}, or use layout: revisions."
            )

    @property
    def repo_template(self) -> str:
        return self.repo_id or DEFAULT_REPO_TEMPLATES[self.layout]

    def resolved_endpoint(self) -> str:
        from huggingface_hub import constants

        # HfApi(endpoint=None) reads HF_ENDPOINT once, at import time; read it now so a later setting counts.
        return (self.endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


@dataclass
class HubTarget:
    """A checked connection: the API client, the user the token belongs to, and the run's name."""

    config: HubConfig
    api: Any
    user: str
    run: str
    endpoint: str

    def names(self, index: int, stage: str) -> tuple[str, str | None]:
        """``(repo_id, revision)`` of stage ``index`` (1-based) named ``stage``; revision is None for 'repos'."""
        values = {"user": self.user, "run": self.run, "stage": stage, "index": index}
        repo_id = self.config.repo_template.format(**values)
        revision = self.config.revision.format(**values) if self.config.layout == "revisions" else None
        return repo_id, revision


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def find_token(config: HubConfig) -> str | None:
    token = os.environ.get(config.token_env) if config.token_env else None
    if token:
        return token.strip()
    from huggingface_hub import get_token

    return get_token()


def hub_preflight(config: HubConfig, run: str, stage_names: list[str]) -> HubTarget:
    """Check, before training, that every stage can be pushed: a token, a reachable endpoint, valid names.

    Raises :class:`HubError` naming the problem and the fix; the message never contains the token.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    endpoint = config.resolved_endpoint()
    token = find_token(config)
    if not token:
        raise HubError(
            f"hub.push is true but no Hugging Face token was found (${config.token_env} is unset and there is no "
            "saved login). Set it, e.g. `export HF_TOKEN=hf_...`, or run `hf auth login`; or set hub.push: false. "
            "Nothing was trained."
        )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise HubError(
            "hub.push is true but HF_HUB_OFFLINE is set, so nothing can be pushed. Unset HF_HUB_OFFLINE or set "
            "hub.push: false. Nothing was trained."
        )
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.whoami()
    except Exception as err:  # connection refused, DNS, timeout, 401: all mean the stages could not be pushed
        detail = _redact(f"{type(err).__name__}: {err}", token).splitlines()[0][:300]
        raise HubError(
            f"hub.push is true but the Hub at {endpoint} cannot be used with the token from ${config.token_env} "
            f"({detail}). Check the network (or hub.endpoint / HF_ENDPOINT) and that the token is valid with write "
            "access; or set hub.push: false. Nothing was trained."
        ) from None
    user = info.get("name") if isinstance(info, dict) else None
    if not user:
        raise HubError(f"The Hub at {endpoint} did not say which user the token belongs to (whoami: no 'name').")
    target = HubTarget(config, api, user, run, endpoint)
    for index, stage in enumerate(stage_names, start=1):
        repo_id, revision = target.names(index, stage)
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            raise HubError(
                f"hub.repo_id {config.repo_template!r} gives the invalid repository id {repo_id!r} for stage "
                f"{index} ({stage}): {err} Change hub.repo_id or the run/stage names."
            ) from None
        if revision is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", revision):
            raise HubError(
                f"hub.revision {config.revision!r} gives the invalid branch name {revision!r} for stage {index}."
            )
    logger.info("Hub: pushing stages as %s to %s (as user %s).", config.layout, endpoint, user)
    return target


def stage_files(stage_dir: str) -> list[tuple[str, str]]:
    """``(path_in_repo, local_path)`` of what a stage folder pushes: all but its Trainer checkpoints and pickles."""
    files = []
    for root, dirs, names in os.walk(stage_dir):
        rel_root = os.path.relpath(root, stage_dir)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if d not in IGNORED_DIRS]
        dirs.sort()
        for name in sorted(n for n in names if n not in IGNORED_FILES):
            path = os.path.join(root, name)
            files.append((os.path.normpath(os.path.join(rel_root, name)).replace(os.sep, "/"), path))
    return files


def push_stage(target: HubTarget, stage_dir: str, index: int, stage: str) -> dict:
    """Push one finished stage folder; returns ``{"repo_id", "revision", "commit"}`` (no token)."""
    from huggingface_hub import CommitOperationAdd

    repo_id, revision = target.names(index, stage)
    api = target.api
    try:
        api.create_repo(repo_id, private=target.config.private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=path) for rel, path in stage_files(stage_dir)]
        info = api.create_commit(
            repo_id, operations, commit_message=f"GeRe stage {index}: {stage}", revision=revision,
        )
    except Exception as err:
        token = getattr(api, "token", None)
        raise HubError(
            f"Pushing stage {index} ({stage}) to {repo_id}{'@' + revision if revision else ''} failed: "
            f"{_redact(f'{type(err).__name__}: {err}', token if isinstance(token, str) else None)}. The stage is "
            "saved locally; rerun with --resume to push it again."
        ) from None
    commit = getattr(info, "oid", None)
    logger.info("Hub: pushed stage %d (%s) to %s%s", index, stage, repo_id, f" at {revision}" if revision else "")
    return {"repo_id": repo_id, "revision": revision, "commit": commit, "endpoint": target.endpoint}


# ----------------------------------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(
    *,
    run: str,
    base_model: str,
    base_model_hub_id: str | None,
    index: int,
    num_stages: int,
    stage: str,
    task: dict,
    stages: list[str],
    gere: dict,
    method: str,
    metrics: dict,
    tracking: dict | None = None,
) -> str:
    """The README.md of a stage: base model, stage and task, GeRe settings, the stage's metrics (its row of the
    accuracy matrix) and, as TRL's cards do, the method with a link to its paper and its BibTeX.

    Args:
        base_model: the recipe's model (name, path or Hub id), shown as is.
        base_model_hub_id: the Hub id for the card's ``base_model`` metadata, or None (a local or random model: the
            Hub rejects a ``base_model`` that is not a repository id).
        task: ``Task.describe()`` of the stage's task.
        method: 'LoRA (continue)', 'LoRA (stack)', 'OSF (stack)' or 'full fine-tuning'.
        metrics: ``{"train": {...}, "accuracy": {...}, "general": {...}}`` of the stage.
        tracking: the stage's tracking record (``run_state.json``: W&B run id and URL, TensorBoard folder), if any.
    """
    library = "transformers" if method == "full fine-tuning" else "peft"
    replay = gere.get("loss", "tm") != "none"
    tags = [*(GERE_TAGS if replay else ("continual-learning",)), "trl", "sft"]
    if library == "peft":
        tags.append(method.split(" ")[0].lower())  # lora, osf
    meta = ["---"]
    if base_model_hub_id:
        meta.append(f"base_model: {base_model_hub_id}")
    meta += [f"library_name: {library}", "tags:", *(f"- {t}" for t in tags), "---"]
    if replay:
        intro = (f"Stage {index} of a continual fine-tuning run with GeRe (General Sample Replay), made with gere_hf "
                 f"(`gere-hf run`). {method_sentence()}")
    else:
        intro = (f"Stage {index} of a continual fine-tuning run without replay (`gere.loss: none`: the baseline GeRe "
                 "is compared with), made with gere_hf (`gere-hf run`).")
    lines = [
        "\n".join(meta),
        "",
        f"# {run}: stage {index}/{num_stages}, `{stage}`",
        "",
        intro,
        "",
        f"- **Base model:** `{base_model}`",
        f"- **Method:** {method}",
        f"- **Task sequence:** {' → '.join(f'**{s}**' if s == stage else s for s in stages)}",
        f"- **This stage's task:** `{task.get('name', stage)}` ({task.get('num_train')} training / "
        f"{task.get('num_eval')} eval examples, scored by {task.get('scoring')})",
    ]
    source = (task.get("meta") or {}).get("source")
    if source:
        lines.append(f"- **Data:** {source}")
    lines += ["", "## GeRe settings", "", "| setting | value |", "|---|---|"]
    for key in ("loss", "weight", "threshold_k", "replay_source", "replay_num_samples", "replay_max_length",
                "replay_per_step", "replay_share", "replay_seed", "reference"):
        if key in gere:
            lines.append(f"| {key} | {_fmt(gere[key])} |")
    lines += ["", "## Metrics", ""]
    train = metrics.get("train") or {}
    if train:
        lines += ["| training | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in train.items() if isinstance(v, (int, float))]
        lines.append("")
    accuracy = metrics.get("accuracy") or {}
    if accuracy:
        lines += ["Accuracy after this stage on every task of the sequence:", "",
                  "| task | accuracy |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in accuracy.items()]
        lines.append("")
    general = metrics.get("general") or {}
    if general:
        lines.append(f"Held-out general text: NLL {_fmt(general.get('nll'))}, perplexity {_fmt(general.get('ppl'))}.")
        lines.append("")
    links = [f"[W&B run]({tracking['wandb_url']})" if (tracking or {}).get("wandb_url") else None,
             f"W&B run id `{tracking['wandb_run_id']}`" if (tracking or {}).get("wandb_run_id") else None,
             f"TensorBoard logs in `{tracking['tensorboard_dir']}`" if (tracking or {}).get("tensorboard_dir") else None]
    if any(links):
        lines += ["Training logs: " + ", ".join(x for x in links if x) + ".", ""]
    lines += ["## Loading", ""]
    if method.endswith("(stack)") and index > 1:
        lines += [f"This adapter was trained on the base model with the adapters of stages 1..{index - 1} merged into "
                  f"it: apply the adapters of stages 1..{index} in order (merge each but the last).", ""]
    if library == "peft":
        lines += ["```python", "from gere_hf import load_stage_model",
                  "# from the run folder: the base model with this stage's adapter(s) applied",
                  f"model, tokenizer = load_stage_model('<output_dir>', {index})", "```", ""]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained('<this repository or folder>')", "```", ""]
    if replay:
        lines.append(citation_markdown())
    return "\n".join(lines)
