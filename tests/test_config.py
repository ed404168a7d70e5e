import math

import pytest
from transformers import HfArgumentParser

from gere_hf import GeReConfig, GeReConfigError


def test_defaults_follow_the_paper():
    c = GeReConfig()
    assert (c.loss, c.weight, c.threshold_k, c.replay_num_samples, c.replay_max_length) == ("tm", "dy", 1.0, 1000, 563)
    assert c.weight_value is None and c.replay_enabled


def test_usable_with_hf_argument_parser():
    (c,) = HfArgumentParser(GeReConfig).parse_args_into_dataclasses(
        ["--loss", "ce", "--weight", "0.5", "--replay_per_step", "4", "--threshold_k", "2"]
    )
    assert c.loss == "ce" and c.weight_value == 0.5 and c.replay_per_step == 4 and c.threshold_k == 2.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss": "mse"}, r"Unknown GeRe loss 'mse'; choose one of tm, ce, kl, l1, l2, none"),
        ({"weight": "dynamic"}, r"Unknown weight 'dynamic'; give a non-negative number, 'dy', or 'dy:C'"),
        ({"weight": "-1"}, r"non-negative"),
        ({"weight": str(math.nan)}, r"non-negative finite"),
        ({"threshold_k": 0.0}, r"threshold_k must be a positive"),
        ({"threshold_k": -1.0}, r"threshold_k must be a positive"),
        ({"reference": "first"}, r"Unknown reference 'first'"),
        ({"replay_per_step": 0}, r"replay_per_step must be ≥ 1"),
        ({"replay_max_length": 1}, r"replay_max_length must be ≥ 2"),
        ({"nonfinite": "ignore"}, r"Unknown nonfinite policy"),
    ],
)
def test_bad_values_fail_with_the_choices(kwargs, match):
    with pytest.raises(GeReConfigError, match=match):
        GeReConfig(**kwargs)


def test_the_weight_is_a_number_dy_or_a_capped_dy():
    import pytest

    from gere_hf import GeReConfig, GeReConfigError

    assert (GeReConfig(weight="dy").weight_value, GeReConfig(weight="dy").weight_cap) == (None, None)
    assert (GeReConfig(weight="dy:10").weight_value, GeReConfig(weight="dy:10").weight_cap) == (None, 10.0)
    assert (GeReConfig(weight="100").weight_value, GeReConfig(weight="100").weight_cap) == (100.0, None)
    for bad in ("dy:0", "dy:-1", "dy:x", "dy:", "dyy", "fast", "dynamic"):
        with pytest.raises(GeReConfigError, match="weight"):
            GeReConfig(weight=bad)
