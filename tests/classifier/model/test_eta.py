"""The expected-duration line and the time left, from the speed of the first batches."""

from __future__ import annotations

import logging

import pytest

from classifier.model import eta


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.42, "0.4 s"),
        (9.94, "9.9 s"),
        (45.4, "45 s"),
        (59.6, "1 min 0 s"),
        (725, "12 min 5 s"),
        (3599.4, "59 min 59 s"),
        (3599.6, "1 h 0 min"),
        (8064.5, "2 h 14 min"),
        (9599, "2 h 40 min"),
    ],
)
def test_duration_reads_as_two_units_at_most(seconds, text):
    assert eta.duration(seconds) == text


def test_the_line_names_the_work_the_time_the_speed_and_the_hardware():
    line = eta.eta_line("finetune", "50 epochs × 2,000 images", 9599, 10.4, device="CPU", policy="float32")
    assert line == "finetune: 50 epochs × 2,000 images ≈ 2 h 40 min at 10.4 img/s on CPU (float32)"


def test_the_speed_leaves_out_the_first_batch_and_is_told_once(caplog):
    times = iter([130.0, 131.0, 132.0, 133.0, 134.0, 135.0])  # when each batch ended; the first, untimed
    pace = eta.Pace("featurize", "2,400 images", 2400, "CPU", "mixed_bfloat16", clock=lambda: next(times))
    with caplog.at_level(logging.INFO, logger="classifier.model.eta"):
        for _ in range(6):
            pace.batch_done(32)
    assert pace.speed == pytest.approx(3 * 32 / 3.0)  # MIN_BATCHES (3) batches after the first, in 3 s
    assert [r.getMessage() for r in caplog.records] == [
        "featurize: 2,400 images ≈ 1 min 15 s at 32.0 img/s on CPU (mixed_bfloat16)"
    ]
