"""The shared latency sketch (services.common.sketch): relative accuracy against exact percentiles,
exact merging, bucket semantics of the wire contract, and the protobuf round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimaas.monitor.v1 import monitor_pb2 as mpb
from services.common.sketch import DEFAULT_ALPHA, MIN_VALUE_US, LatencySketch

QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)


def sketch_of(values, alpha: float = DEFAULT_ALPHA) -> LatencySketch:
    sketch = LatencySketch(alpha)
    sketch.add_many(float(v) for v in values)
    return sketch


def assert_relative_accuracy(sketch: LatencySketch, values: np.ndarray, alpha: float) -> None:
    for q in QUANTILES:
        # The sketch answers the order statistic of rank floor(q·(n-1)): numpy's "lower" method.
        exact = float(np.quantile(values, q, method="lower"))
        estimate = sketch.quantile(q)
        assert estimate is not None
        if exact < MIN_VALUE_US:
            assert estimate == 0.0, (q, exact, estimate)
        else:
            assert abs(estimate - exact) <= alpha * exact * (1 + 1e-9), (q, exact, estimate)


@pytest.mark.parametrize("alpha", [0.01, 0.02, 0.05])
@pytest.mark.parametrize(
    "distribution",
    ["lognormal", "exponential", "uniform-wide", "pareto", "bimodal"],
)
def test_quantiles_are_within_alpha_of_numpy(alpha, distribution):
    rng = np.random.default_rng(7)
    n = 20_000
    values = {
        # Typical request latencies: ~1 ms with a long tail.
        "lognormal": rng.lognormal(mean=7.0, sigma=1.0, size=n),
        "exponential": rng.exponential(scale=250.0, size=n),
        # Six decades: 1 µs to 1 s.
        "uniform-wide": 10 ** rng.uniform(0, 6, size=n),
        "pareto": (rng.pareto(1.5, size=n) + 1) * 100,
        "bimodal": np.concatenate([rng.normal(200, 5, n // 2), rng.normal(50_000, 2_000, n // 2)]).clip(1),
    }[distribution]
    sketch = sketch_of(values, alpha)
    assert sketch.count == n and sketch.zero_count == 0
    assert sketch.mean() == pytest.approx(float(values.mean()), rel=1e-9)
    assert_relative_accuracy(sketch, values, alpha)
    # The bucket count depends on the value range, not on n.
    assert len(sketch.buckets) < math.log(values.max() / values.min()) / math.log(sketch.gamma) + 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False), min_size=1, max_size=300))
def test_relative_accuracy_holds_for_any_values(values):
    array = np.array(values, dtype=np.float64)
    assert_relative_accuracy(sketch_of(array), array, DEFAULT_ALPHA)


def test_bucket_semantics_match_the_wire_contract():
    """Bucket i covers (gamma^(i-1), gamma^i] microseconds, gamma = (1+alpha)/(1-alpha)."""
    sketch = LatencySketch(0.02)
    gamma = (1 + 0.02) / (1 - 0.02)
    assert sketch.gamma == pytest.approx(gamma)
    for i in (-20, -1, 0, 1, 5, 300):
        upper = gamma**i
        assert sketch.index(upper * (1 - 1e-9)) == i
        assert sketch.index(upper * (1 + 1e-9)) == i + 1
        # The estimate of bucket i is within alpha of both ends of the bucket.
        estimate = sketch.estimate(i)
        for end in (gamma ** (i - 1), gamma**i):
            assert abs(estimate - end) <= 0.02 * end * (1 + 1e-9)
    assert sketch.index(1.0) == 0


def test_zero_negative_and_empty():
    sketch = LatencySketch()
    assert sketch.empty and sketch.quantile(0.5) is None and sketch.mean() is None
    for value in (0.0, -3.0, MIN_VALUE_US / 2):
        sketch.add(value)
    sketch.add(100.0)
    assert sketch.count == 4 and sketch.zero_count == 3 and sum(sketch.buckets.values()) == 1
    assert sketch.quantile(0.0) == 0.0 and sketch.quantile(0.5) == 0.0
    assert sketch.quantile(1.0) == pytest.approx(100.0, rel=DEFAULT_ALPHA)
    with pytest.raises(ValueError, match="quantile must be in"):
        sketch.quantile(1.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        LatencySketch(0.0)


def test_merge_is_exact_and_order_independent():
    rng = np.random.default_rng(3)
    parts = [rng.lognormal(6, 1.5, 1000), rng.exponential(40, 500), np.zeros(10), rng.uniform(1, 1e6, 300)]
    whole = sketch_of(np.concatenate(parts))
    forward = LatencySketch()
    for part in parts:
        forward.merge(sketch_of(part))
    backward = LatencySketch()
    for part in reversed(parts):
        backward.merge(sketch_of(part))
    assert forward == whole and backward == whole
    assert forward.quantiles([0.5, 0.99]) == whole.quantiles([0.5, 0.99])
    # merge() leaves its argument alone and copy() is independent.
    part = sketch_of(parts[0])
    snapshot = part.copy()
    LatencySketch().merge(part)
    assert part == snapshot
    snapshot.add(1.0)
    assert part != snapshot
    with pytest.raises(ValueError, match="different accuracy"):
        LatencySketch(0.01).merge(LatencySketch(0.02))


def test_proto_round_trip():
    rng = np.random.default_rng(11)
    sketch = sketch_of(np.concatenate([rng.lognormal(5, 2, 2000), np.zeros(5)]))
    message = sketch.to_proto()
    assert isinstance(message, mpb.LatencySketch)
    assert message.alpha == DEFAULT_ALPHA and message.count == 2005 and message.zero_count == 5
    wire = mpb.LatencySketch.FromString(message.SerializeToString())
    again = LatencySketch.from_proto(wire)
    assert again == sketch
    assert again.quantiles(QUANTILES) == sketch.quantiles(QUANTILES)
    # Sub-microsecond values use negative bucket indices.
    tiny = sketch_of([0.01, 0.5])
    assert all(k < 0 for k in tiny.to_proto().buckets)
    assert LatencySketch.from_proto(tiny.to_proto()) == tiny


def test_from_proto_defaults_and_repairs():
    empty = LatencySketch.from_proto(mpb.LatencySketch())
    assert empty.alpha == DEFAULT_ALPHA and empty.empty
    # A count lower than the buckets hold is raised to their total, so quantiles stay answerable.
    broken = LatencySketch.from_proto(mpb.LatencySketch(alpha=0.01, buckets={10: 3}, count=1))
    assert broken.count == 3 and broken.quantile(1.0) == pytest.approx(broken.estimate(10))
