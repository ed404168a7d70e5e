"""AP, BWT, FWT and forgetting of accuracy matrices with known answers."""

from __future__ import annotations

import pytest

from gere_hf.evaluation import continual_metrics

# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------


def test_continual_metrics_three_stages():
    R = [
        [0.2, 0.3, 0.1],  # base
        [0.9, 0.4, 0.2],  # after stage 1 (task 0)
        [0.7, 0.8, 0.3],  # after stage 2 (task 1)
        [0.6, 0.5, 0.9],  # after stage 3 (task 2)
    ]
    m = continual_metrics(R)
    assert m["num_stages"] == 3
    assert m["ap"] == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert m["fwt"] == pytest.approx(((0.4 - 0.3) + (0.3 - 0.1)) / 2)
    assert m["forgetting"] == pytest.approx([0.9 - 0.6, 0.8 - 0.5])
    assert m["mean_forgetting"] == pytest.approx(0.3)
    assert m["learned"] == [0.9, 0.8, 0.9]
    assert m["ap_per_stage"] == pytest.approx([0.9, 0.75, (0.6 + 0.5 + 0.9) / 3])
    # forgetting takes the best earlier accuracy, not the one just after learning
    assert continual_metrics([[0, 0], [0.5, 0], [0.4, 0.7]])["forgetting"] == pytest.approx([0.1])
    assert continual_metrics([[0, 0, 0], [0.5, 0, 0], [0.8, 0.7, 0], [0.6, 0.7, 1.0]])["forgetting"] == (
        pytest.approx([0.2, 0.0]))


def test_continual_metrics_one_stage_and_no_base():
    m = continual_metrics([[0.25], [0.75]])
    assert m["ap"] == 0.75 and m["bwt"] is None and m["fwt"] is None and m["mean_forgetting"] is None
    assert m["forgetting"] == []
    m = continual_metrics([None, [0.9, 0.1], [0.5, 0.8]])
    assert m["fwt"] is None and m["bwt"] == pytest.approx(-0.4)


@pytest.mark.parametrize(
    "R,match",
    [([[0.5]], "T \\+ 1 >= 2 rows"), ([[0.1, 0.2], [0.3]], "T = 1 stages"), ([[0.1], None], "Row 1"),
     ([[0.1], ["a"]], "non-numbers")],
)
def test_continual_metrics_errors(R, match):
    with pytest.raises(ValueError, match=match):
        continual_metrics(R)
