"""What a store is checked against: hashes of the model's config and base weights, the tokenizer and replay set, the
layer, ``k`` and the precision of the reference forward, and the one check of a store against other base weights."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence

import torch

from ..models import DTYPE_NAMES, find_final_norm, unwrap_causal_lm
from ..replay import ReplaySet
from .errors import ReferenceStoreError, ReferenceStoreMismatch

logger = logging.getLogger(__name__)

FINGERPRINT_FIELDS = ("model_config", "model_weights", "tokenizer", "replay", "max_length", "layer", "k", "precision")
_PRECISIONS = (torch.float32, torch.bfloat16, torch.float16)
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "torch_dtype", "dtype", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict", "architectures", "name_or_path",
}


def short_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def model_config_hash(model) -> str:
    config = unwrap_causal_lm(model).config.to_dict()
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return short_sha(json.dumps(kept, sort_keys=True, default=str).encode())


def _adapter_parameter_ids(model) -> set[int]:
    """The parameters PEFT declares as adapter state: every tuner layer and auxiliary wrapper (modules_to_save,
    trainable tokens) names its adapter attributes in ``adapter_layer_names`` and ``other_param_names``, so any
    present or future method that follows PEFT's layer protocol is covered without a list of name prefixes here.
    Adaption prompt's attention wrappers predate the protocol: their two parameters are named here."""
    ids: set[int] = set()
    for module in model.modules():
        names = (*getattr(module, "adapter_layer_names", ()), *getattr(module, "other_param_names", ()))
        if _is_adaption_prompt_wrapper(module):
            names = (*names, "adaption_prompt", "adaption_gate")
        for path in names:
            target = module
            for part in path.split("."):
                target = getattr(target, part, None)
            if isinstance(target, torch.nn.Parameter):
                ids.add(id(target))
            elif isinstance(target, torch.nn.Module):
                ids.update(id(p) for p in target.parameters())
    return ids


def _is_adaption_prompt_wrapper(module) -> bool:
    return isinstance(getattr(module, "adaption_prompt", None), torch.nn.Parameter) and hasattr(module, "model")


def _base_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters of the base model under their names without PEFT (the wrapped original module of a tuner layer,
    of modules_to_save and of adaption prompt's attention is where the base weights live), adapters left out."""
    base = unwrap_causal_lm(model)
    adapters = _adapter_parameter_ids(model)
    wrapped = [f"{name}.model." for name, module in base.named_modules() if _is_adaption_prompt_wrapper(module)]
    params = []
    for name, param in base.named_parameters():
        if id(param) in adapters:
            continue
        for prefix in wrapped:
            if name.startswith(prefix):
                name = prefix[: -len("model.")] + name[len(prefix):]
        params.append((name.replace(".base_layer", "").replace(".original_module", ""), param))
    return sorted(params, key=lambda kv: kv[0])


def model_weights_hash(model, max_params: int = 32, elements: int = 16) -> str:
    """Hash of a deterministic sample of the base weights: up to ``max_params`` tensors, ``elements`` values each."""
    params = _base_parameters(model)
    if len(params) > max_params:
        step = len(params) / max_params
        params = [params[int(i * step)] for i in range(max_params)]
    h = hashlib.sha256()
    for name, param in params:
        gather = contextlib.nullcontext()
        if getattr(param, "ds_numel", None) is not None and param.numel() == 0:  # ZeRO-3 partitioned
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([param])
        with gather, torch.no_grad():
            # FSDP2 shards parameters as DTensors: the sampled values are read from the whole tensor, so a sharded
            # model hashes like the same model unsharded (full_tensor is a collective: every rank hashes, in order).
            flat = (param.full_tensor() if _is_dtensor(param) else param).detach().reshape(-1)
            # Integer arithmetic: a float32 linspace rounds n - 1 up to n for tensors of more than 2**24 elements.
            steps = min(elements, flat.numel())
            idx = torch.arange(steps, dtype=torch.long) * (flat.numel() - 1) // max(steps - 1, 1)
            values = flat[idx.to(flat.device)].float().cpu().numpy()
            h.update(f"{name}{tuple(param.shape) if param.numel() else param.ds_shape}".encode())
            h.update(values.tobytes())
    return h.hexdigest()[:16]


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(tensor, DTensor)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch floating dtype from a name ('bf16', 'bfloat16', 'fp32', ...) or a dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ReferenceStoreError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16 (fp32, bf16, fp16).")
    return getattr(torch, DTYPE_NAMES[key])


def precision_name(dtype: torch.dtype | str) -> str:
    """The canonical name of a precision ('float32', 'bfloat16', 'float16'), as stores record it."""
    dtype = as_dtype(dtype)
    if dtype not in _PRECISIONS:
        raise ReferenceStoreError(f"{dtype} is not a precision a reference forward can run at.")
    return str(dtype).removeprefix("torch.")


def model_precision(model) -> str:
    """The dtype of the base model's floating weights (PEFT adapters, often kept in fp32, left out)."""
    for _, param in _base_parameters(model):
        if param.is_floating_point():
            return precision_name(param.dtype)
    return "float32"


def compute_fingerprint(model, replay: ReplaySet, k: float = 1.0, precision: torch.dtype | str | None = None) -> dict:
    """What a store is checked against. ``precision`` is the dtype the reference forward computes in (default: the
    model's): a store recorded at fp32 and a model trained under bf16 autocast disagree by rounding noise."""
    layer, _ = find_final_norm(model)
    return {
        "model_config": model_config_hash(model),
        "model_weights": model_weights_hash(model),
        "tokenizer": replay.tokenizer_hash,
        "replay": replay.content_hash,
        "max_length": int(replay.max_length),
        "layer": layer,
        "k": float(k),
        "precision": precision_name(precision) if precision is not None else model_precision(model),
    }


def compare_fingerprints(stored: dict, expected: dict, fields: Sequence[str] = FINGERPRINT_FIELDS) -> dict:
    """``{field: (stored, expected)}`` for the ``fields`` of ``expected`` whose values differ."""
    return {f: (stored.get(f), expected.get(f)) for f in fields if f in expected and stored.get(f) != expected.get(f)}


def check_base_weights(path: str, stored: dict, weights: str, *, peft: bool, is_base: bool = False) -> None:
    """The check of a 'base' store (fingerprint ``stored``, at ``path``) against a model's base weights (``weights``,
    :func:`model_weights_hash`). A 'base' store is reused by later stages: under PEFT the adapter-free weights never
    change in a continual run, so other base weights mean another model, refused; under full fine-tuning they change
    by design, so a difference is only warned about, unless the model is known to be the base one (``is_base``: a
    run's stage 1), where it is refused too."""
    differences = compare_fingerprints(stored, {"model_weights": weights})
    if not differences:
        return
    recorded = stored.get("model_weights")
    if peft:
        raise ReferenceStoreMismatch(
            path, differences,
            detail=(
                "The model is a PEFT model whose frozen base weights differ from the base model the store was "
                f"recorded from (store {recorded}, this model {weights}): adapters never change those weights, so "
                "this is another base model. Point store_dir at a store of this base model, or rebuild "
                "(GeReConfig(rebuild_store=True)). Adapters merged into the base between stages (stacked "
                "adapters) change them too: open the store yourself and pass reference_states=, as "
                "`gere-hf run` does."
            ),
        )
    if is_base:
        raise ReferenceStoreMismatch(
            path, differences,
            detail=(f"The store was recorded from other base weights (store {recorded}, this model {weights}). Point "
                    "store_dir elsewhere, delete the store, or rebuild it (GeReConfig(rebuild_store=True)).")
        )
    logger.warning(
        "GeRe: the model's weights (%s) differ from those the reference store at %s was recorded from (%s). "
        "Expected after stage 1 of full fine-tuning; if this is not a later stage, the store belongs to another "
        "model: rebuild it.", weights, path, recorded,
    )
