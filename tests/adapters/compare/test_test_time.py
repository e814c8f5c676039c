"""Test-time strategies in the comparison: names, and accuracies that must agree.

``adapt``, ``prior:N`` and ``stream:<strategy>`` start from the exact one-pass statistics
and adapt them to the (maybe shifted) test set, one network and one shift at a time. Their
definitions give identities that hold whatever the network learned:

- ``prior:0`` and ``stream:ema:1`` normalize every test batch with its own statistics:
  exactly ``batch``;
- an ``offset`` shift adds a constant to every input, which the first Linear layer turns into
  a constant per unit and the BatchNorm after it removes when its statistics come from the
  shifted data: ``batch`` and ``adapt`` score the same with and without it (up to rounding,
  which may flip a sample whose two best classes tie).
"""

from __future__ import annotations

import pytest

from normstats.adapters.compare import strategies

pytest.importorskip("torch")
pytest.importorskip("sklearn")

TEST_TIME = ("adapt", "prior:0", "prior:16", "stream:ema:1", "stream:welford")


def test_names_are_parsed_and_not_tracked_in_training():
    names = strategies.parse(["exact", *TEST_TIME, "ema:0.1"])
    assert names == ("exact", *TEST_TIME, "ema:0.1")
    assert strategies.tracked(names) == ("ema:0.1",)
    assert [strategies.is_test_time(n) for n in names] == [False, *[True] * 5, False]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("prior:-1", r"^--strategies: .*prior"),
        ("prior:x", r"^--strategies: .*prior"),
        ("stream:nope", r"^--strategies: "),
        ("adapt:3", r"^--strategies: "),
    ],
)
def test_bad_test_time_names_name_the_option(name, message):
    with pytest.raises(strategies.StrategyError, match=message):
        strategies.parse(name)


@pytest.fixture(scope="module")
def records():
    from normstats.adapters.compare import compare

    return compare(
        "digits",
        backends=("numpy", "torch"),
        batch_sizes=[32],
        seeds=1,
        epochs=[2],
        strategies=("exact", "batch", *TEST_TIME),
        shifts=("none", "offset:0.8"),
        workers=1,
    )


def accuracies(records):
    return {(r.backend, r.shift, r.strategy): r.accuracy for r in records}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("shift", ["none", "offset:0.8"])
def test_batch_statistics_under_every_name_score_the_same(records, backend, shift):
    found = accuracies(records)
    batch = found[(backend, shift, "batch")]
    assert found[(backend, shift, "prior:0")] == batch
    assert found[(backend, shift, "stream:ema:1")] == batch


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", ["batch", "adapt"])
def test_an_offset_is_absorbed_by_statistics_of_the_shifted_data(records, backend, name):
    found = accuracies(records)
    test_size = next(r.test_size for r in records)
    difference = abs(found[(backend, "offset:0.8", name)] - found[(backend, "none", name)])
    assert difference <= 1 / test_size


def test_test_time_records_carry_no_statistics_distance(records):
    for record in records:
        if strategies.is_test_time(record.strategy):
            assert record.stats_distance == []
            assert 0.5 < record.accuracy <= 1.0
