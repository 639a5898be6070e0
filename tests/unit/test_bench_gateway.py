"""Pure pieces of bench/gateway: ratios against the direct gRPC baseline, round merging, target, args.

No servers are started here; `python -m bench.gateway.run --quick` is the smoke run.
"""

from __future__ import annotations

import time

import pytest

from bench.gateway.run import (
    TARGET_REST_BINARY_P50_OVER_GRPC, headline, merge_rounds, parse_args, process_cpu_probe, ratios, target_entry,
)


def test_ratios_are_rest_over_direct_grpc():
    results = {
        "grpc_direct": {"p50_ms": 0.5, "rps": 2000.0},
        "grpc_gateway": {"p50_ms": 0.625, "rps": 1600.0},
        "rest_binary": {"p50_ms": 0.7, "rps": 1500.0},
        "rest_json": {"p50_ms": 1.0, "rps": 1000.0},
    }
    assert ratios(results) == {
        "rest_binary_p50_over_grpc": 1.4,
        "rest_binary_rps_over_grpc": 0.75,
        "rest_binary_p50_over_grpc_gateway": 1.12,
        "rest_json_p50_over_grpc": 2.0,
        "rest_json_rps_over_grpc": 0.5,
        "rest_json_p50_over_grpc_gateway": 1.6,
        "grpc_gateway_p50_over_grpc": 1.25,
    }


def test_ratios_with_a_missing_side_are_none():
    assert set(ratios({"rest_binary": {"p50_ms": 1.0, "rps": 5.0}}).values()) == {None}
    no_requests = {"grpc_direct": {"p50_ms": None, "rps": 0.0}, "rest_binary": {"p50_ms": 1.0, "rps": 10.0}}
    assert ratios(no_requests)["rest_binary_p50_over_grpc"] is None
    assert ratios(no_requests)["rest_binary_rps_over_grpc"] is None


def test_target_is_met_at_or_below_one_and_a_half():
    assert TARGET_REST_BINARY_P50_OVER_GRPC == 1.5
    assert target_entry(1.5)["met"] is True
    assert target_entry(1.51)["met"] is False
    assert target_entry(None)["met"] is None and target_entry(None)["measured"] is None


def test_merge_rounds_pools_latencies_time_and_errors():
    merged = merge_rounds([([0.001] * 10, 0.5, 1), ([0.003] * 10, 0.5, 2)])
    assert merged["requests"] == 20 and merged["errors"] == 3
    assert merged["rps"] == 20.0
    assert merged["p50_ms"] == pytest.approx(2.0)
    assert merged["mean_ms"] == pytest.approx(2.0)


def test_merge_rounds_turns_process_cpu_into_microseconds_per_request():
    merged = merge_rounds([([0.001] * 10, 0.5, 0, {"gateway": 0.002, "node": 0.001}),
                           ([0.001] * 30, 0.5, 0, {"gateway": 0.006, "node": 0.003})])
    assert merged["cpu_us_per_request"] == {"gateway": 200.0, "node": 100.0}
    assert "cpu_us_per_request" not in merge_rounds([([0.001], 0.1, 0)])


def test_process_cpu_probe_counts_this_process_work():
    probe = process_cpu_probe()
    before = probe()
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    # psutil counts in clock ticks (10 ms here): allow for two of them.
    assert probe() - before >= 0.075


def test_headline_prints_every_mode_and_the_ratio():
    side = {"p50_ms": 1.0, "rps": 100.0}
    modes = {"grpc_direct": side, "grpc_gateway": side, "rest_binary": side, "rest_json": side}
    report = {
        "sequential": {**modes, "ratios": ratios(modes)},
        "concurrent": {"clients": 8, **modes, "ratios": ratios(modes)},
        "edge_cpu_us": {"best_us": 90.0},
        "targets": {"rest_binary_p50_vs_grpc": target_entry(1.0)},
    }
    report["sequential"]["rest_binary"] = {**side, "cpu_us_per_request": {"gateway": 321.5}}
    text = headline(report)
    assert "rest_binary 1.0x" in text and "met=True" in text and "90.0 µs" in text and "gateway 321.5" in text


def test_parse_args_quick_defaults():
    quick = parse_args(["--quick"])
    assert quick.quick and quick.requests == 200 and quick.rounds == 2
    full = parse_args([])
    assert full.requests == 2000 and full.rounds == 3 and str(full.out) == "bench/results/gateway.json"
