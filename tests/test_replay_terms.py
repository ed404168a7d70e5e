"""The registry of replay terms: what GeReConfig, the store build, the collator and the trainer read from it."""

from __future__ import annotations

import pytest
import torch
from test_trainer import TOK, _args, _lm_dataset, _model
from transformers import DataCollatorForLanguageModeling

from gere_hf import GeReConfig, GeReConfigError, GeReTrainer, ReplayTerm, register_replay_term
from gere_hf.replay_terms import REPLAY_TERMS, get_replay_term, replay_loss_names


def test_the_paper_terms_are_registered_with_what_they_need():
    assert replay_loss_names() == ("tm", "ce", "kl", "l1", "l2", "none")
    assert get_replay_term("ce") is None and get_replay_term("none") is None
    needs = {name: (t.reads, t.store_extras, t.needs_labels) for name, t in REPLAY_TERMS.items()}
    assert needs == {"tm": ("hidden", (), True), "kl": ("logits", ("topk",), False),
                     "l1": ("hidden", ("hidden",), False), "l2": ("hidden", ("hidden",), False)}
    assert GeReConfig(loss="kl").store_extras == ("topk",) and GeReConfig(loss="ce").store_extras == ()


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "ce"}, "not terms"), ({"name": "none"}, "not terms"), ({"reads": "attention"}, "reads must be"),
    ({"store_extras": ("logits",)}, "unknown store extras"),
])
def test_bad_terms_are_refused(kwargs, match):
    options = {"name": "x", "reads": "hidden", "compute": lambda inputs: None, **kwargs}
    with pytest.raises(ValueError, match=match):
        ReplayTerm(**options)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="registered already"):
        register_replay_term(ReplayTerm("tm", reads="hidden", compute=lambda inputs: None))


def test_a_new_term_is_one_function_and_one_entry(tmp_path):
    """The example of docs/losses.md: a cosine term on the stored fp16 hidden states, through the whole trainer."""

    def cosine_term(inputs):
        keep = inputs.mask.bool()
        cos = torch.nn.functional.cosine_similarity(inputs.hidden.float(), inputs.batch["ref_hidden"].float(), dim=-1)
        return torch.where(keep, 1 - cos, 0).sum(1) / keep.sum(1).clamp(min=1)

    register_replay_term(ReplayTerm("cos", reads="hidden", compute=cosine_term, store_extras=("hidden",)))
    try:
        config = GeReConfig(loss="cos", replay_source="wiki", replay_num_samples=8, replay_max_length=32,
                            replay_per_step=4, store_dir=str(tmp_path / "store"))
        assert config.store_extras == ("hidden",)
        turned = _model()
        with torch.no_grad():
            turned.model.norm.weight[::2] *= -1  # a scale would not change a cosine; half the signs do
        results = {}
        for name, model in (("reference", _model()), ("perturbed", turned)):
            trainer = GeReTrainer(model=model, args=_args(tmp_path / name, steps=1), train_dataset=_lm_dataset(),
                                  data_collator=DataCollatorForLanguageModeling(TOK, mlm=False),
                                  processing_class=TOK, gere_config=config)
            trainer.train()
            assert trainer.gere_store.extras == ("hidden",)  # the build recorded what the entry asks for
            results[name] = trainer.state.log_history[0]["replay_term"]
        assert results["reference"] < 1e-3 < results["perturbed"]  # 0 up to the fp16 rounding of the stored states
    finally:
        REPLAY_TERMS.pop("cos")
    with pytest.raises(GeReConfigError, match="Unknown GeRe loss 'cos'"):
        GeReConfig(loss="cos")
