"""Pure pieces of bench/inference: percentiles, summaries, report schema, model, MLServer files,
plus the bare grpc.aio ceiling server as a real process.

No AIMaaS node or MLServer is started here; `python -m bench.inference.run --quick` is the smoke run.
"""

from __future__ import annotations

import ast
import json

import numpy as np
import onnx
import pytest

from bench.inference import model as bench_model
from bench.inference import servers as bench_servers
from bench.inference.run import headline, parse_args
from bench.inference.stats import (
    SCHEMA_VERSION, call_summary, latency_summary, overhead_section, percentile, ratio, targets_section,
    validate_report,
)


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy_linear(q: float, n: int) -> None:
    values = list(np.random.default_rng(n).exponential(size=n))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_small_cases_and_errors() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_units_and_rate() -> None:
    summary = latency_summary([0.001] * 99 + [0.002], elapsed_s=0.5, errors=2)
    assert summary["requests"] == 100
    assert summary["errors"] == 2
    assert summary["rps"] == 200.0
    assert summary["p50_ms"] == 1.0
    assert summary["p99_ms"] == pytest.approx(1.01)  # rank 98.01: 1 ms + 0.01 * 1 ms
    assert summary["mean_ms"] == pytest.approx(1.01)
    empty = latency_summary([], elapsed_s=1.0, errors=5)
    assert empty["rps"] == 0.0 and empty["p50_ms"] is None and empty["errors"] == 5
    with pytest.raises(ValueError):
        latency_summary([0.1], elapsed_s=0)


def test_call_summary_in_microseconds() -> None:
    summary = call_summary([5e-6, 6e-6, 7e-6])
    assert summary == {"calls": 3, "p50_us": 6.0, "p99_us": pytest.approx(6.98), "mean_us": 6.0}


def test_ratio_handles_missing_sides() -> None:
    assert ratio(3000.0, 1000.0) == 3.0
    assert ratio(1.0, 3.0, digits=3) == 0.333
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_targets_met_not_met_and_unmeasured() -> None:
    targets = targets_section(2.5, 2.9, 120.0, clients=64)
    assert targets["sequential_vs_mlserver"]["met"] is True
    assert targets["sequential_vs_mlserver"]["target"] == ">= 2.0x"
    assert targets["batching_on_vs_off"]["met"] is False
    assert targets["server_overhead_reported"] == {**targets["server_overhead_reported"], "measured_us": 120.0, "met": True}
    unmeasured = targets_section(None, 3.0, 120.0, clients=64, mlserver_error="mlserver not installed")
    assert unmeasured["sequential_vs_mlserver"]["met"] is None
    assert unmeasured["sequential_vs_mlserver"]["not_measured_because"] == "mlserver not installed"
    assert unmeasured["batching_on_vs_off"]["met"] is True  # exactly on target counts


def test_overhead_is_p50_minus_in_process() -> None:
    section = overhead_section(0.25, 5.6, aimaas_batching_off_p50_ms=0.2, mlserver_p50_ms=None)
    assert section["aimaas_p50_us"] == 250.0
    assert section["overhead_us"] == 244.4
    assert section["aimaas_batching_off_overhead_us"] == 194.4
    assert section["mlserver_overhead_us"] is None
    failed = overhead_section(None, 5.6)  # every AIMaaS request failed: no figure, no crash
    assert failed["aimaas_p50_us"] is None and failed["overhead_us"] is None


def _report(**overrides) -> dict:
    seq = latency_summary([0.0002] * 10, 0.002)
    ml = latency_summary([0.001] * 10, 0.01)
    ceiling = {**latency_summary([0.0001] * 10, 0.001), "what": "bare servicer"}
    grpcio = {**latency_summary([0.0004] * 10, 0.004), "what": "node on grpcio"}
    report = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "inference",
        "quick": True,
        "machine": {"cpus": 2},
        "model": bench_model.describe(b"model"),
        "in_process_onnxruntime": {"per_batch": [{"batch": 1, **call_summary([5e-6])}]},
        "sequential": {"aimaas": seq, "mlserver": ml, "mlserver_error": None,
                       "ratio_rps_aimaas_over_mlserver": ratio(seq["rps"], ml["rps"]),
                       "grpc_aio_ceiling": ceiling, "ratio_rps_ceiling_over_mlserver": ratio(ceiling["rps"], ml["rps"]),
                       "aimaas_over_grpc_aio_ceiling": ratio(seq["rps"], ceiling["rps"]),
                       "aimaas_grpcio_frontend": grpcio,
                       "ratio_rps_aimaas_grpcio_frontend_over_mlserver": ratio(grpcio["rps"], ml["rps"]),
                       "ratio_rps_aimaas_over_aimaas_grpcio_frontend": ratio(seq["rps"], grpcio["rps"])},
        "concurrent": {"clients": 64, "batching_on": seq, "batching_off": ml, "ratio_rps_on_over_off": 5.0},
        "server_overhead": overhead_section(seq["p50_ms"], 5.0),
        "targets": targets_section(5.0, 5.0, 195.0, clients=64),
    }
    report.update(overrides)
    return report


def test_validate_report_accepts_a_complete_document_and_survives_json() -> None:
    report = _report()
    assert validate_report(report) == []
    assert validate_report(json.loads(json.dumps(report))) == []


def test_validate_report_names_the_problems() -> None:
    report = _report()
    del report["targets"]
    assert validate_report(report) == ["missing or mistyped key 'targets'"]
    no_mlserver = {"aimaas": {}, "mlserver": None, "ratio_rps_aimaas_over_mlserver": None, "grpc_aio_ceiling": None,
                   "ratio_rps_ceiling_over_mlserver": None, "aimaas_over_grpc_aio_ceiling": None,
                   "aimaas_grpcio_frontend": None, "ratio_rps_aimaas_grpcio_frontend_over_mlserver": None,
                   "ratio_rps_aimaas_over_aimaas_grpcio_frontend": None}
    report = _report(sequential=no_mlserver)
    assert validate_report(report) == ["sequential.mlserver is null without sequential.mlserver_error"]
    report = _report(targets={"sequential_vs_mlserver": {"met": True, "measured": 2.0}})
    assert validate_report(report) == ["targets.batching_on_vs_off missing or incomplete"]


def test_validate_report_checks_the_ceiling_fields() -> None:
    report = _report()
    report["sequential"]["grpc_aio_ceiling"] = None  # --skip-ceiling
    assert validate_report(report) == []
    report["sequential"]["grpc_aio_ceiling"] = {"rps": 1.0}
    assert validate_report(report) == ["sequential.grpc_aio_ceiling has no rps or what"]
    del report["sequential"]["aimaas_over_grpc_aio_ceiling"]
    assert "sequential.aimaas_over_grpc_aio_ceiling missing" in validate_report(report)
    report = _report()
    report["sequential"]["aimaas_grpcio_frontend"] = {"rps": 1.0}
    assert validate_report(report) == ["sequential.aimaas_grpcio_frontend has no rps or what"]


def test_model_is_the_example_mlp_with_a_dynamic_batch() -> None:
    import onnxruntime as ort

    proto = bench_model.build_model()
    onnx.checker.check_model(proto)
    graph = proto.graph
    assert [i.name for i in graph.input] == [bench_model.INPUT_NAME]
    assert [o.name for o in graph.output] == [bench_model.OUTPUT_NAME]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    assert weights["W1"].shape == (64, 256) and weights["W2"].shape == (256, 10)

    session = ort.InferenceSession(bench_model.model_bytes(), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 64):
        x = bench_model.sample_input(batch, seed=batch)
        assert x.dtype == np.float32 and x.shape == (batch, 64)
        (y,) = session.run(None, {bench_model.INPUT_NAME: x})
        reference = np.maximum(x @ weights["W1"] + weights["b1"], 0) @ weights["W2"] + weights["b2"]
        assert y.shape == (batch, 10)
        np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-5)
    # Deterministic bytes: both servers and the in-process baseline get the same model.
    assert bench_model.model_bytes() == bench_model.model_bytes()
    described = bench_model.describe(bench_model.model_bytes())
    assert len(described["sha256"]) == 64 and described["onnx_bytes"] > 64 * 256 * 4


def test_aimaas_repository_layout(tmp_path) -> None:
    root = bench_model.write_aimaas_repository(tmp_path, b"onnx")
    assert (root / "mlp" / "1" / "model.onnx").read_bytes() == b"onnx"


def test_mlserver_repository_files(tmp_path) -> None:
    root = bench_model.write_mlserver_repository(tmp_path, b"onnx", grpc_port=12345, http_port=12346)
    settings = json.loads((root / "settings.json").read_text())
    # MLServer 1.7.1 dies at start with parallel workers on this uvloop; loopback only; no metrics server.
    assert settings["parallel_workers"] == 0
    assert settings["host"] == "127.0.0.1"
    assert (settings["grpc_port"], settings["http_port"]) == (12345, 12346)
    assert settings["metrics_endpoint"] is None
    model_settings = json.loads((root / "mlp" / "model-settings.json").read_text())
    assert model_settings["name"] == bench_model.MODEL_NAME
    assert model_settings["parameters"]["version"] == bench_model.MODEL_VERSION
    module, cls = model_settings["implementation"].rsplit(".", 1)
    runtime = root / "mlp" / f"{module}.py"
    assert (root / "mlp" / "model.onnx").read_bytes() == b"onnx"
    # The runtime imports mlserver (absent here): check its shape without importing it.
    tree = ast.parse(runtime.read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    methods = {fn.name for fn in classes[cls].body if isinstance(fn, ast.AsyncFunctionDef)}
    assert {"load", "predict"} <= methods
    assert [base.id for base in classes[cls].bases] == ["MLModel"]


def test_cli_defaults_full_and_quick() -> None:
    full = parse_args([])
    assert (full.requests, full.rounds, full.duration, full.clients) == (3000, 3, 10.0, 64)
    assert str(full.out) == "bench/results/inference.json" and full.skip_ceiling is False
    quick = parse_args(["--quick", "--out", "x.json"])
    assert (quick.requests, quick.rounds, quick.duration, quick.warmup_requests) == (300, 1, 2.0, 50)
    with pytest.raises(SystemExit):
        parse_args(["--client-procs", "65"])


def test_headline_quotes_each_figure_with_its_baseline() -> None:
    text = headline(_report())
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("(a) sequential batch 1: AIMaaS 5000.0 req/s") and "MLServer 1000.0 req/s" in lines[0]
    assert "5.0x (target >= 2x: met)" in lines[0]
    assert lines[1].startswith("(a') grpcio: the node on grpcio's server 2500.0 req/s → 2.5x MLServer (the h2 front end: 2.0x it); "
                               "a bare grpc.aio servicer with a prepared response 10000.0 req/s")
    assert "→ 10.0x MLServer; AIMaaS 0.5x it" in lines[1]
    assert "batching on 5000.0 req/s" in lines[2] and "off 1000.0 req/s" in lines[2]
    assert "= 195.0 µs" in lines[3]
    missing = _report()
    missing["sequential"] = {**missing["sequential"], "mlserver": None, "mlserver_error": "not installed\ndetails",
                             "ratio_rps_aimaas_over_mlserver": None}
    missing["targets"] = targets_section(None, 5.0, 195.0, clients=64, mlserver_error="not installed")
    assert "MLServer n/a (not installed)" in headline(missing) and "not measured" in headline(missing)
    assert "→ MLServer n/a; AIMaaS 0.5x it" in headline(missing)
    skipped = _report()
    skipped["sequential"] = {**skipped["sequential"], "grpc_aio_ceiling": None}
    assert "(a') grpcio: not measured (--skip-ceiling)" in headline(skipped)


def test_ceiling_server_answers_with_its_prepared_response(tmp_path) -> None:
    import tritonclient.grpc as grpcclient

    with bench_servers.ceiling_server(tmp_path) as server:
        server.wait_ready(bench_model.MODEL_NAME, bench_model.MODEL_VERSION, timeout=30)
        client = grpcclient.InferenceServerClient(server.url)
        try:
            infer_input = grpcclient.InferInput(bench_model.INPUT_NAME, [1, bench_model.FEATURES], "FP32")
            infer_input.set_data_from_numpy(bench_model.sample_input(1))
            result = client.infer(bench_model.MODEL_NAME, [infer_input], model_version=bench_model.MODEL_VERSION,
                                  request_id="req-7", client_timeout=10)
            plain = client.infer(bench_model.MODEL_NAME, [infer_input], client_timeout=10)
        finally:
            client.close()
        output = result.as_numpy(bench_model.OUTPUT_NAME)
        assert output.dtype == np.float32 and output.shape == (1, bench_model.CLASSES)
        response = result.get_response()
        assert response.id == "req-7"
        assert (response.model_name, response.model_version) == (bench_model.MODEL_NAME, bench_model.MODEL_VERSION)
        assert plain.get_response().id == ""  # the id of one request never leaks into the next
        process = server.process
    # SIGTERM ends it promptly (stop() waits at most its grace period before SIGKILL).
    assert process.returncode == 0
