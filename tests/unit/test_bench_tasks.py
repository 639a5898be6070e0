"""Pure pieces of bench/tasks: each side's HTTP requests and answers, the load client's framing,
MLServer's settings files and log notes, padding efficiency, summaries, ratios, targets, the
report's schema and its printed summary.

No mesh, node or MLServer is started here; `python -m bench.tasks.run --quick` is the smoke run.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.tasks import stats
from bench.tasks.load import Connection
from bench.tasks.model import TEXTS, word_counts
from bench.tasks.run import parse_args, summarize


# ------------------------------------------------------------------------------------ requests


def test_each_side_posts_its_own_json_shape() -> None:
    assert stats.request_path(stats.AIMAAS, "m") == "/v1/models/m/predict"
    assert stats.request_path(stats.AIMAAS_OIP, "m") == "/v2/models/m/infer"
    assert stats.request_path(stats.MLSERVER, "m") == "/v2/models/m/infer"
    assert json.loads(stats.request_body(stats.AIMAAS, "héllo")) == {"text": "héllo"}
    oip = json.loads(stats.request_body(stats.AIMAAS_OIP, "hi"))
    assert oip["inputs"] == [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]
    assert [o["name"] for o in oip["outputs"]] == ["label", "score"]
    ml = json.loads(stats.request_body(stats.MLSERVER, "hi"))
    # `array_inputs`: the Hugging Face runtime passes it to the pipeline as one list, so requests
    # merged by MLServer's adaptive batcher stay one call.
    assert ml["inputs"] == [{"name": "array_inputs", "shape": [1], "datatype": "BYTES", "data": ["hi"],
                             "parameters": {"content_type": "str"}}]
    with pytest.raises(ValueError, match="unknown side"):
        stats.request_body("triton", "x")
    with pytest.raises(ValueError, match="unknown side"):
        stats.request_path("triton", "x")


def test_http_request_is_one_buffer_with_an_exact_content_length() -> None:
    data = stats.http_request(stats.AIMAAS, "m", "ça va", "127.0.0.1:8000")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/models/m/predict HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["host"] == "127.0.0.1:8000" and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body) and json.loads(body) == {"text": "ça va"}


def test_response_heads() -> None:
    assert stats.parse_response_head(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n") == (200, 12, False)
    assert stats.parse_response_head(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\nConnection: close\r\n\r\n") == (400, 3, True)
    assert stats.parse_response_head(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n") == (200, 0, True)
    assert stats.parse_response_head(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n")[2] is False
    for bad, fragment in [(b"SSH-2.0\r\n\r\n", "status line"), (b"HTTP/1.1 200 OK\r\n\r\n", "no content-length"),
                          (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", "chunked"),
                          (b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", "bad content-length")]:
        with pytest.raises(stats.ResponseError, match=fragment):
            stats.parse_response_head(bad)


def test_answers_of_each_side() -> None:
    aimaas = b'{"model":"m","model_version":"1","task":"text-classification","label":"positive","score":0.75,"truncated":false}'
    assert stats.parse_answer(stats.AIMAAS, aimaas) == ("positive", 0.75)
    oip = {"outputs": [{"name": "score", "datatype": "FP32", "shape": [1], "data": [0.25]},
                       {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["negative"]}]}
    assert stats.parse_answer(stats.AIMAAS_OIP, json.dumps(oip).encode()) == ("negative", 0.25)
    # MLServer's Hugging Face runtime: one JSON string per text (hg_jsonlist), sometimes a list per text.
    ml = {"outputs": [{"name": "output", "shape": [1, 1], "datatype": "BYTES",
                       "data": ['{"label": "positive", "score": 0.5054}']}]}
    assert stats.parse_answer(stats.MLSERVER, json.dumps(ml).encode()) == ("positive", 0.5054)
    ml["outputs"][0]["data"] = ['[{"label": "negative", "score": 0.6}]']
    assert stats.parse_answer(stats.MLSERVER, json.dumps(ml).encode()) == ("negative", 0.6)


def test_answers_match_the_in_process_ones_within_tolerance() -> None:
    expected = [("positive", 0.5), ("negative", 0.7)]
    assert stats.answers_match([("positive", 0.50001), ("negative", 0.7)], expected)["match"] is True
    off = stats.answers_match([("positive", 0.51), ("negative", 0.7)], expected)
    assert off["match"] is False and off["labels_equal"] == 2 and off["max_abs_score_difference"] == pytest.approx(0.01)
    assert stats.answers_match([("negative", 0.5), ("negative", 0.7)], expected)["labels_equal"] == 1
    assert stats.answers_match([("positive", 0.5)], expected)["match"] is False


# ------------------------------------------------------------------------------------ the load client


async def test_the_load_client_keeps_its_connection_and_reconnects_after_close() -> None:
    connections = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        served = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            body = await reader.readexactly(length)
            served += 1
            close = served == 2
            answer = b'{"echo":' + body + b"}"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(answer)).encode()
                         + (b"\r\nconnection: close" if close else b"") + b"\r\n\r\n" + answer)
            await writer.drain()
            if close:
                break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Connection("127.0.0.1", port)
    try:
        answers = []
        for text in ("a", "b", "c"):
            status, body = await client.request(stats.http_request(stats.AIMAAS, "m", text, f"127.0.0.1:{port}"))
            answers.append((status, json.loads(body)["echo"]["text"]))
        assert answers == [(200, "a"), (200, "b"), (200, "c")]
        assert len(connections) == 2  # one kept for two requests, a new one after `connection: close`
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------------------------------ MLServer


def test_mlserver_settings_files() -> None:
    settings = stats.mlserver_settings(8080, 8081)
    assert settings["parallel_workers"] == 0 and settings["host"] == "127.0.0.1"
    assert (settings["http_port"], settings["grpc_port"], settings["metrics_endpoint"]) == (8080, 8081, None)
    plain = stats.mlserver_model_settings("m", "/models/m")
    assert plain["implementation"] == "mlserver_huggingface.HuggingFaceRuntime"
    assert plain["parameters"]["extra"] == {"task": "text-classification", "pretrained_model": "/models/m",
                                            "framework": "pt", "device": "cpu"}
    assert "max_batch_size" not in plain and "max_batch_time" not in plain
    batched = stats.mlserver_model_settings("b", "/models/m", max_batch_size=32, max_batch_time_s=0.005)
    assert (batched["max_batch_size"], batched["max_batch_time"]) == (32, 0.005)
    assert "max_batch_size" not in stats.mlserver_model_settings("b", "/d", max_batch_size=1)
    with pytest.raises(ValueError):
        stats.mlserver_model_settings("b", "/d", max_batch_time_s=-1)


def test_mlserver_log_notes_and_versions() -> None:
    log = "\n".join([
        "2026-12-08 01:19:16,184 [mlserver][m:1] INFO - Loading model for task 'text-classification'...",
        "2026-12-08 01:19:16,351 [mlserver] WARNING - Model has neither pad_token or eos_token, setting batch size to 1",
        "2026-12-08 01:19:16,434 [mlserver][m:1] WARNING - Model has neither pad_token or eos_token, setting batch size to 1",
    ])
    assert stats.mlserver_log_notes(log) == ["Model has neither pad_token or eos_token, setting batch size to 1"]
    assert stats.mlserver_log_notes("") == []
    text = "mlserver==1.7.1\nTransformers==4.41.2\nnoise\ntorch_threads==2\n=oops\n"
    assert stats.parse_versions(text) == {"mlserver": "1.7.1", "transformers": "4.41.2", "torch_threads": "2"}


# ------------------------------------------------------------------------------------ figures


def test_padding_efficiency() -> None:
    assert stats.padding_efficiency([10, 10, 10], 2) == 1.0
    assert stats.padding_efficiency([5], 1) == 1.0
    # [2, 4] twice in turn: batches (2, 4), (2, 4) → 12 real tokens over 16 computed.
    assert stats.padding_efficiency([2, 4], 2) == 0.75
    with pytest.raises(ValueError):
        stats.padding_efficiency([], 4)


def test_ratios_best_of_and_targets() -> None:
    assert stats.rps_ratio({"rps": 150.0}, {"rps": 100.0}) == 1.5
    assert stats.rps_ratio(None, {"rps": 100.0}) is None and stats.p50_ratio({"p50_ms": 2.0}, {"p50_ms": 0}) is None
    assert stats.best_of({"a": {"rps": 5.0}, "b": {"rps": 7.0}, "c": None}) == ("b", {"rps": 7.0})
    assert stats.best_of({"a": None, "b": {"rps": 0.0}}) == (None, None)
    targets = stats.targets_section(1.49, 2.0, 3.0, clients=32, mlserver_error=None)
    assert targets["aimaas_vs_mlserver_sequential"]["met"] is False
    assert targets["aimaas_vs_mlserver_concurrent"]["met"] is True and targets["batching_on_vs_off"]["met"] is True
    assert "32 concurrent" in targets["batching_on_vs_off"]["description"]
    missing = stats.targets_section(None, None, 0.9, clients=8, mlserver_error="MLServer exited with 1")
    assert missing["aimaas_vs_mlserver_concurrent"]["met"] is None
    assert missing["aimaas_vs_mlserver_concurrent"]["not_measured_because"] == "MLServer exited with 1"
    assert missing["batching_on_vs_off"]["met"] is False


def test_summarize_counts_every_window_and_server_cpu() -> None:
    rounds = [
        {"latencies_s": [0.01] * 100, "errors": 1, "unfinished": 0, "client_cpu_s": 0.02,
         "error_samples": ["HTTP 503: x"], "server_cpu_s": {"gateway": 0.1, "node": 0.5}},
        {"latencies_s": [0.03] * 100, "errors": 0, "unfinished": 2, "client_cpu_s": 0.02, "error_samples": [],
         "server_cpu_s": {"gateway": 0.1, "node": 0.5}},
    ]
    summary = summarize(rounds, duration=2.0)
    assert summary["requests"] == 200 and summary["errors"] == 1 and summary["unanswered"] == 2
    assert summary["rps"] == 50.0 and summary["rps_per_round"] == [50.0, 50.0]
    assert summary["p50_ms"] == pytest.approx(20.0)
    assert summary["server_cpu_us_per_request"] == {"gateway": 1000.0, "node": 5000.0}
    assert summary["server_cpu_cores_busy"] == 0.3 and summary["client_cpu_us_per_request"] == 200.0
    assert summary["error_samples"] == ["HTTP 503: x"]


def _report(mlserver: bool = True) -> dict:
    side = {"rps": 100.0, "p50_ms": 9.0, "server_cpu_us_per_request": {"gateway": 1300.0, "node": 7000.0}}
    ml = {"rps": 50.0, "p50_ms": 15.0} if mlserver else None
    error = None if mlserver else "MLServer's Hugging Face runtime is not installed at x: python3 -m venv x"
    conc_on, conc_off = {"rps": 120.0, "p50_ms": 250.0, "avg_server_batch_size": 14.9}, {"rps": 110.0, "p50_ms": 280.0}
    best = {"rps": 60.0, "p50_ms": 450.0} if mlserver else None
    return {
        "schema_version": stats.SCHEMA_VERSION, "benchmark": "tasks", "quick": False,
        "machine": {"cpus": 2}, "software": {}, "mlserver_error": error,
        "model": {"architecture": "BertForSequenceClassification", "texts": 34, "words_per_text": {"min": 5, "max": 38}},
        "in_process": {"batch_ceiling": {"batch": 32, "batch_1_texts_per_s": 180.0, "batch_n_texts_per_s": 120.0,
                                         "ratio": 0.67, "padding_efficiency": 0.45, "median_text_tokens": 17,
                                         "ratio_without_padding": 1.7}},
        "sequential": {"floor": {"rps": 150.0, "p50_ms": 6.0}, "aimaas": side,
                       "aimaas_oip": {"rps": 130.0, "p50_ms": 7.0, "server_cpu_us_per_request": {"gateway": 850.0}},
                       "node_grpc": {"rps": 160.0, "p50_ms": 6.1},
                       "mlserver": ml, "ratio_rps_aimaas_over_floor": 0.67, "aimaas_overhead_p50_ms": 3.0,
                       "ratio_rps_aimaas_over_mlserver": stats.rps_ratio(side, ml), "ratio_p50_aimaas_over_aimaas_oip": 1.29},
        "concurrent": {"clients": 32, "aimaas_batching_on": conc_on, "aimaas_batching_off": conc_off,
                       "mlserver_adaptive_batching": best, "mlserver_no_batching": ml,
                       "mlserver_best_config": "mlserver_adaptive_batching" if mlserver else None, "mlserver_best": best,
                       "ratio_rps_batching_on_over_off": stats.rps_ratio(conc_on, conc_off),
                       "ratio_rps_aimaas_over_mlserver_best": stats.rps_ratio(conc_on, best)},
        "targets": stats.targets_section(stats.rps_ratio(side, ml), stats.rps_ratio(conc_on, best),
                                         stats.rps_ratio(conc_on, conc_off), clients=32, mlserver_error=error),
    }


def test_report_schema_and_headline() -> None:
    report = _report()
    assert stats.validate_report(report) == []
    text = stats.headline(report)
    assert "→ 2.0x (target >= 1.5x: met)" in text  # sequential 100 vs 50
    assert "32 clients: AIMaaS (batching on) 120.0 req/s (p50 250.0 ms) vs MLServer best (mlserver_adaptive_batching)" in text
    assert "→ 1.09x (target >= 3.0x: NOT met)" in text and "mean batch formed 14.9" in text
    assert ("floor 6.0 ms, the node over gRPC 6.1 ms, the gateway's OIP REST endpoint 7.0 ms, its task endpoint 9.0 ms; "
            "gateway CPU per request: task endpoint 1300.0 µs vs OIP 850.0 µs") in text
    assert "without padding (the median text, 17 tokens, x32) 1.7x" in text

    broken = dict(report, concurrent={"clients": 32})
    assert any("concurrent.aimaas_batching_on" in p for p in stats.validate_report(broken))
    assert stats.validate_report({"schema_version": 1}) != []


def test_report_without_mlserver_says_why() -> None:
    report = _report(mlserver=False)
    assert stats.validate_report(report) == []
    assert report["targets"]["aimaas_vs_mlserver_sequential"]["met"] is None
    text = stats.headline(report)
    assert "MLServer HF runtime REST n/a (MLServer's Hugging Face runtime is not installed" in text
    assert "(target >= 1.5x: not measured)" in text
    silent = dict(report, mlserver_error=None)
    assert "sequential.mlserver is null without mlserver_error" in stats.validate_report(silent)


def test_args_and_texts() -> None:
    full, quick = parse_args([]), parse_args(["--quick"])
    assert (full.rounds, full.seq_seconds, full.conc_seconds, full.clients) == (3, 8.0, 10.0, 32)
    assert (quick.rounds, quick.seq_seconds, quick.conc_seconds, quick.warmup_seconds) == (1, 2.0, 3.0, 1.0)
    assert parse_args(["--warmup-seconds", "0"]).warmup_seconds == 0
    for bad in (["--clients", "0"], ["--rounds", "0"], ["--mlserver-max-batch-size", "1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    counts = word_counts()
    assert len(TEXTS) == len(set(TEXTS)) >= 32 and min(counts) >= 5 and max(counts) <= 40
