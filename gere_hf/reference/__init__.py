"""The reference store: what GeRe needs from the base model, recorded once and reused in every stage.

For every replay token and hidden dimension the store keeps a 2-bit label of the base model's last hidden state
(after the final norm) relative to per-dimension thresholds ``mean ± k·std`` computed over all replay tokens:
−1 if the value is ≤ lower, +1 if ≥ upper, 0 in between. That is all the threshold-margin loss needs, at 2 bits
instead of the 32 bits per element of fp32 per-sample files. Optional extras are stored only when a loss needs them:
fp16 hidden states (L1/L2 feature imitation) and top-k teacher log-probs with their ids (KL logit imitation).

Layout of a store directory (no pickle anywhere)::

    manifest.json         format version, fingerprint, shapes, k, sizes, checksums, build time (written last)
    stats.safetensors     float64 count/sum/sumsq/mean/var/std and float32 lower/upper, per hidden dimension
    index.safetensors     per-sample lengths and offsets into the flat files below
    tokens.bin            replay token ids, samples concatenated, in the narrowest integer type that holds the
                          vocabulary (uint16 up to 65,536 entries, else int32; ``token_dtype`` in the manifest)
    labels.bin            2-bit labels, 4 per byte, samples concatenated (memory-mapped; reading sample i
                          touches only its bytes)
    hidden.bin            optional, fp16 [tokens, H]
    topk_logprobs.bin     optional, fp32 [tokens, K];  topk_ids.bin optional, int32 [tokens, K]

A build is resumable and atomic: chunks of samples are written to ``.building/`` under temporary names and renamed
when complete; the final files are assembled from the chunks and ``manifest.json`` is written last, so an
interrupted build is never opened as complete and a resumed one ends byte-identical to an uninterrupted one.

Modules, one idea each: :mod:`.format` (file names, versions, the 2-bit labels), :mod:`.fingerprint` (what a store
is checked against), :mod:`.files` (the manifest and small file helpers), :mod:`.store` (the reader:
:class:`ReferenceStore`), :mod:`.builder` (the build) and :mod:`.exchange` (what the ranks of a build send each other
over ``torch.distributed``); :mod:`.errors` holds what they raise.
"""

from .builder import ChunkPlan, StoreBuilder, padding_forwards_per_rank, validate_build_args
from .errors import ReferenceStatesError, ReferenceStatesMismatch, ReferenceStoreError, ReferenceStoreMismatch
from .files import foreign_files, read_manifest
from .fingerprint import (
    FINGERPRINT_FIELDS,
    as_dtype,
    check_base_weights,
    compare_fingerprints,
    compute_fingerprint,
    model_config_hash,
    model_precision,
    model_weights_hash,
    precision_name,
)
from .format import (
    BUILDING,
    EXTRA_FILES,
    FORMAT_VERSION,
    KNOWN_EXTRAS,
    MANIFEST,
    READABLE_FORMAT_VERSIONS,
    STORE_FILES,
    is_store,
    pack_labels,
    packed_size,
    token_dtype_for,
    unpack_labels,
)
from .store import ReferenceStates, ReferenceStore

__all__ = [
    "BUILDING",
    "EXTRA_FILES",
    "FINGERPRINT_FIELDS",
    "FORMAT_VERSION",
    "KNOWN_EXTRAS",
    "MANIFEST",
    "READABLE_FORMAT_VERSIONS",
    "STORE_FILES",
    "ChunkPlan",
    "ReferenceStates",
    "ReferenceStatesError",
    "ReferenceStatesMismatch",
    "ReferenceStore",
    "ReferenceStoreError",
    "ReferenceStoreMismatch",
    "StoreBuilder",
    "as_dtype",
    "check_base_weights",
    "compare_fingerprints",
    "compute_fingerprint",
    "foreign_files",
    "is_store",
    "model_config_hash",
    "model_precision",
    "model_weights_hash",
    "pack_labels",
    "packed_size",
    "padding_forwards_per_rank",
    "precision_name",
    "read_manifest",
    "token_dtype_for",
    "unpack_labels",
    "validate_build_args",
]
