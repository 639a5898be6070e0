"""Pure pieces of the inference bench: percentiles, summaries, ratios, targets, report schema.

No servers, no clocks: everything here is unit-tested (tests/unit/test_bench_inference.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SCHEMA_VERSION = 3  # 2: sequential.grpc_aio_ceiling and its ratios; 3: the node on grpcio (aimaas_grpcio_frontend)
TARGET_SEQUENTIAL_VS_MLSERVER = 2.0
TARGET_BATCHING_ON_VS_OFF = 3.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    Same definition as numpy's default (`method="linear"`): rank = q/100 * (n-1).
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    fraction = rank - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def latency_summary(latencies_s: Sequence[float], elapsed_s: float, errors: int = 0) -> dict:
    """Throughput and latency of one measured phase (latencies in seconds, figures in ms)."""
    if elapsed_s <= 0:
        raise ValueError("elapsed time must be positive")
    count = len(latencies_s)
    if count == 0:
        return {"requests": 0, "errors": errors, "elapsed_s": round(elapsed_s, 3), "rps": 0.0,
                "p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None}
    return {
        "requests": count,
        "errors": errors,
        "elapsed_s": round(elapsed_s, 3),
        "rps": round(count / elapsed_s, 1),
        "p50_ms": round(percentile(latencies_s, 50) * 1e3, 4),
        "p90_ms": round(percentile(latencies_s, 90) * 1e3, 4),
        "p99_ms": round(percentile(latencies_s, 99) * 1e3, 4),
        "mean_ms": round(sum(latencies_s) / count * 1e3, 4),
    }


def call_summary(durations_s: Sequence[float]) -> dict:
    """Per-call timings of an in-process function, in µs."""
    return {
        "calls": len(durations_s),
        "p50_us": round(percentile(durations_s, 50) * 1e6, 2),
        "p99_us": round(percentile(durations_s, 99) * 1e6, 2),
        "mean_us": round(sum(durations_s) / len(durations_s) * 1e6, 2),
    }


def ratio(value: float | None, baseline: float | None, digits: int = 2) -> float | None:
    """value / baseline, or None when either side is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return round(value / baseline, digits)


def target(name: str, measured: float | None, goal: float, description: str, reason: str | None = None) -> dict:
    """One entry of the `targets` section: met is None when it could not be measured."""
    entry = {
        "description": description,
        "target": f">= {goal}x",
        "measured": measured,
        "met": None if measured is None else measured >= goal,
    }
    if measured is None:
        entry["not_measured_because"] = reason or "not measured"
    return {name: entry}


REQUIRED = {
    "schema_version": int,
    "benchmark": str,
    "quick": bool,
    "machine": dict,
    "model": dict,
    "in_process_onnxruntime": dict,
    "sequential": dict,
    "concurrent": dict,
    "server_overhead": dict,
    "targets": dict,
}


def validate_report(report: dict) -> list[str]:
    """Problems with a result document (empty list: valid). Checks shape, not figures."""
    problems = [f"missing or mistyped key {key!r}" for key, kind in REQUIRED.items()
                if not isinstance(report.get(key), kind)]
    if problems:
        return problems
    if not report["in_process_onnxruntime"].get("per_batch"):
        problems.append("in_process_onnxruntime.per_batch is empty")
    seq = report["sequential"]
    for key in ("aimaas", "mlserver", "ratio_rps_aimaas_over_mlserver", "grpc_aio_ceiling",
                "ratio_rps_ceiling_over_mlserver", "aimaas_over_grpc_aio_ceiling", "aimaas_grpcio_frontend",
                "ratio_rps_aimaas_grpcio_frontend_over_mlserver", "ratio_rps_aimaas_over_aimaas_grpcio_frontend"):
        if key not in seq:
            problems.append(f"sequential.{key} missing")
    if seq.get("mlserver") is None and not seq.get("mlserver_error"):
        problems.append("sequential.mlserver is null without sequential.mlserver_error")
    ceiling = seq.get("grpc_aio_ceiling")  # null: not run (--skip-ceiling)
    if ceiling is not None and not (isinstance(ceiling, dict) and "rps" in ceiling and "what" in ceiling):
        problems.append("sequential.grpc_aio_ceiling has no rps or what")
    grpcio = seq.get("aimaas_grpcio_frontend")  # null: not run (--skip-ceiling)
    if grpcio is not None and not (isinstance(grpcio, dict) and "rps" in grpcio and "what" in grpcio):
        problems.append("sequential.aimaas_grpcio_frontend has no rps or what")
    conc = report["concurrent"]
    for key in ("clients", "batching_on", "batching_off", "ratio_rps_on_over_off"):
        if key not in conc:
            problems.append(f"concurrent.{key} missing")
    overhead = report["server_overhead"]
    for key in ("aimaas_p50_us", "in_process_p50_us", "overhead_us"):
        if key not in overhead:
            problems.append(f"server_overhead.{key} missing")
    for name in ("sequential_vs_mlserver", "batching_on_vs_off"):
        entry = report["targets"].get(name)
        if not isinstance(entry, dict) or "met" not in entry or "measured" not in entry:
            problems.append(f"targets.{name} missing or incomplete")
    return problems


def overhead_section(aimaas_p50_ms: float | None, in_process_p50_us: float, *, aimaas_batching_off_p50_ms: float | None = None,
                     mlserver_p50_ms: float | None = None) -> dict:
    """(c): client-seen p50 latency minus in-process ONNX Runtime p50, both at batch 1, in µs."""
    def minus(p50_ms: float | None) -> float | None:
        return None if p50_ms is None else round(p50_ms * 1e3 - in_process_p50_us, 1)

    return {
        "what": "sequential p50 latency seen by the tritonclient.grpc client minus in-process onnxruntime p50, batch 1",
        "aimaas_p50_us": None if aimaas_p50_ms is None else round(aimaas_p50_ms * 1e3, 1),
        "in_process_p50_us": in_process_p50_us,
        "overhead_us": minus(aimaas_p50_ms),
        "aimaas_batching_off_overhead_us": minus(aimaas_batching_off_p50_ms),
        "mlserver_overhead_us": minus(mlserver_p50_ms),
        "note": "includes the client's own tritonclient/gRPC work and loopback TCP, as any user would see",
    }


def targets_section(sequential_ratio: float | None, concurrent_ratio: float | None, overhead_us: float | None,
                    *, clients: int, mlserver_error: str | None = None) -> dict:
    return {
        **target("sequential_vs_mlserver", sequential_ratio, TARGET_SEQUENTIAL_VS_MLSERVER,
                 "(a) AIMaaS sequential req/s over MLServer 1.7.1 sequential req/s, same model, same run",
                 reason=mlserver_error),
        **target("batching_on_vs_off", concurrent_ratio, TARGET_BATCHING_ON_VS_OFF,
                 f"(b) AIMaaS throughput with {clients} concurrent clients, batching on over off"),
        "server_overhead_reported": {
            "description": "(c) AIMaaS p50 minus in-process ONNX Runtime p50 at batch 1: reported, no target",
            "measured_us": overhead_us,
            "met": overhead_us is not None,
        },
    }
