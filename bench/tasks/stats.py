"""Pure pieces of the task-model bench: HTTP requests and answers of each side, MLServer's files,
round summaries, ratios, targets and the printed summary.

No servers, no clocks: unit-tested in tests/unit/test_bench_tasks.py. Ratios and target entries
are bench/inference's (`bench.inference.stats`); rounds are merged into latency summaries by
bench/gateway's `merge_rounds` (re-exported here for run.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from bench.gateway.run import merge_rounds
from bench.inference.stats import ratio, target

SCHEMA_VERSION = 1
TARGET_AIMAAS_OVER_MLSERVER = 1.5
TARGET_BATCHING_ON_OVER_OFF = 3.0
# Scores of two servers of the same weights agree to this (PyTorch vs ONNX Runtime, float32).
SCORE_TOLERANCE = 1e-4

# The sides measured over HTTP (what the load worker knows how to ask).
AIMAAS = "aimaas"
# The same deployment through the gateway's Open Inference Protocol REST endpoint (JSON, BYTES text).
AIMAAS_OIP = "aimaas_oip"
MLSERVER = "mlserver"
SIDES = (AIMAAS, AIMAAS_OIP, MLSERVER)
# The inference node itself over gRPC (tritonclient), no gateway: not an HTTP side.
NODE_GRPC = "node_grpc"
# MLServer's Hugging Face runtime batches what comes as its `array_inputs` input (a list of texts
# passed to the pipeline as one argument); `args` inputs are spread as positional arguments, so a
# request merged by its adaptive batcher from two `args` requests fails (TypeError in the pipeline).
MLSERVER_INPUT = "array_inputs"

# ------------------------------------------------------------------------------------ requests


def request_path(side: str, model: str) -> str:
    if side == AIMAAS:
        return f"/v1/models/{model}/predict"
    if side in (MLSERVER, AIMAAS_OIP):
        return f"/v2/models/{model}/infer"
    raise ValueError(f"unknown side {side!r} (known: {', '.join(SIDES)})")


def request_body(side: str, text: str) -> bytes:
    """The JSON body one text is sent as: AIMaaS's task endpoint; AIMaaS's OIP endpoint with the
    served `text` input, asking for the label and score; or MLServer's V2 REST inference with one
    BYTES element decoded as a string (content_type "str")."""
    if side == AIMAAS:
        document: dict = {"text": text}
    elif side == AIMAAS_OIP:
        document = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}],
                    "outputs": [{"name": "label"}, {"name": "score"}]}
    elif side == MLSERVER:
        document = {"inputs": [{"name": MLSERVER_INPUT, "shape": [1], "datatype": "BYTES", "data": [text],
                                "parameters": {"content_type": "str"}}]}
    else:
        raise ValueError(f"unknown side {side!r} (known: {', '.join(SIDES)})")
    return json.dumps(document, separators=(",", ":")).encode()


def http_request(side: str, model: str, text: str, host: str) -> bytes:
    """A complete keep-alive HTTP/1.1 POST, head and body in one buffer (one write per request)."""
    body = request_body(side, text)
    head = (f"POST {request_path(side, model)} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"accept: application/json\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


class ResponseError(ValueError):
    pass


def parse_response_head(head: bytes) -> tuple[int, int, bool]:
    """(status, content length, connection closes after it) of a response head ending in CRLFCRLF.
    Only content-length framed answers are accepted (every server here sends them)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ResponseError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    status = int(parts[1])
    length = None
    close = parts[0] == "HTTP/1.0"
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length":
            if not value.isdigit():
                raise ResponseError(f"bad content-length {value!r}")
            length = int(value)
        elif name == "transfer-encoding" and value.lower() != "identity":
            raise ResponseError(f"transfer-encoding {value} is not supported by the bench client")
        elif name == "connection":
            close = value.lower() == "close"
    if length is None:
        raise ResponseError("the response has no content-length")
    return status, length, close


def parse_answer(side: str, body: bytes) -> tuple[str, float]:
    """(label, score) of one text's answer from either side."""
    document = json.loads(body)
    if side == AIMAAS:
        return str(document["label"]), float(document["score"])
    if side == AIMAAS_OIP:
        outputs = {output["name"]: output["data"] for output in document["outputs"]}
        return str(outputs["label"][0]), float(outputs["score"][0])
    if side == MLSERVER:
        output = document["outputs"][0]
        item = output["data"][0]
        answer = json.loads(item) if isinstance(item, str) else item
        if isinstance(answer, list):  # some pipelines answer a list per text
            answer = answer[0]
        return str(answer["label"]), float(answer["score"])
    raise ValueError(f"unknown side {side!r}")


def answers_match(got: Sequence[tuple[str, float]], expected: Sequence[tuple[str, float]],
                  tolerance: float = SCORE_TOLERANCE) -> dict:
    """Label equality and the largest score difference against the in-process answers."""
    if len(got) != len(expected):
        return {"match": False, "texts": len(got), "reason": f"{len(got)} answers for {len(expected)} texts"}
    labels = sum(g[0] == e[0] for g, e in zip(got, expected))
    worst = max((abs(g[1] - e[1]) for g, e in zip(got, expected)), default=0.0)
    return {"match": labels == len(expected) and worst <= tolerance, "texts": len(expected),
            "labels_equal": labels, "max_abs_score_difference": float(f"{worst:.3g}")}


# ------------------------------------------------------------------------------------ MLServer


def mlserver_settings(http_port: int, grpc_port: int) -> dict:
    """MLServer 1.7.1's settings.json: loopback, metrics off, `parallel_workers: 0` (it dies at start
    otherwise with current uvloop: bench/inference/mlserver_runtime/settings.json)."""
    return {"debug": False, "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
            "parallel_workers": 0, "metrics_endpoint": None, "load_models_at_startup": True}


def mlserver_model_settings(name: str, model_dir: str, *, max_batch_size: int = 0, max_batch_time_s: float = 0.0,
                            task: str = "text-classification") -> dict:
    """model-settings.json of one MLServer Hugging Face model; max_batch_size > 1 turns on MLServer's
    adaptive batching (requests merged for up to max_batch_time_s)."""
    if max_batch_size < 0 or max_batch_time_s < 0:
        raise ValueError("max_batch_size and max_batch_time_s must not be negative")
    document: dict = {
        "name": name,
        "implementation": "mlserver_huggingface.HuggingFaceRuntime",
        "parameters": {"version": "1", "extra": {"task": task, "pretrained_model": model_dir, "framework": "pt",
                                                 "device": "cpu"}},
    }
    if max_batch_size > 1:
        document["max_batch_size"] = max_batch_size
        document["max_batch_time"] = max_batch_time_s
    return document


# Lines of MLServer's log worth carrying into the report (how its runtime set itself up).
_MLSERVER_NOTES = ("setting batch size to 1", "Adaptive Batching is enabled")


def mlserver_log_notes(log_text: str) -> list[str]:
    """Distinct warnings of MLServer's log that change what is measured (e.g. its Hugging Face
    runtime turning the pipeline's batch size down to 1), without timestamps."""
    notes: list[str] = []
    for line in log_text.splitlines():
        if any(fragment in line for fragment in _MLSERVER_NOTES):
            text = line.split(" - ", 1)[-1].strip()
            if text not in notes:
                notes.append(text)
    return notes


def parse_versions(text: str) -> dict[str, str]:
    """`name==version` lines (pip freeze style, `import x; print(...)` output) into a dict; other lines ignored."""
    found = {}
    for line in text.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and name and version:
            found[name.strip().lower()] = version.strip()
    return found


# ------------------------------------------------------------------------------------ report


def padding_efficiency(lengths: Sequence[int], batch: int) -> float:
    """Real tokens over computed tokens when texts of these token lengths are merged `batch` at a
    time, in turn, each batch padded to its longest text (1.0: no padding). Over `batch` passes
    through the texts, so every text starts a batch once."""
    if not lengths or batch < 1:
        raise ValueError("need token lengths and a batch size >= 1")
    count = len(lengths)
    real = padded = 0
    for start in range(0, count * batch, batch):
        chunk = [lengths[(start + i) % count] for i in range(batch)]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return round(real / padded, 3)


def rps_ratio(value: dict | None, baseline: dict | None) -> float | None:
    return ratio(value and value.get("rps"), baseline and baseline.get("rps"))


def p50_ratio(value: dict | None, baseline: dict | None) -> float | None:
    return ratio(value and value.get("p50_ms"), baseline and baseline.get("p50_ms"))


def best_of(summaries: dict[str, dict | None]) -> tuple[str | None, dict | None]:
    """(name, summary) of the configuration with the most req/s (None when none was measured)."""
    measured = {name: s for name, s in summaries.items() if s and s.get("rps")}
    if not measured:
        return None, None
    name = max(measured, key=lambda key: measured[key]["rps"])
    return name, measured[name]


def targets_section(sequential_ratio: float | None, concurrent_ratio: float | None, batching_ratio: float | None,
                    *, clients: int, mlserver_error: str | None) -> dict:
    reason = mlserver_error or "MLServer was not measured"
    return {
        **target("aimaas_vs_mlserver_concurrent", concurrent_ratio, TARGET_AIMAAS_OVER_MLSERVER,
                 f"AIMaaS REST predict req/s over MLServer's Hugging Face runtime REST V2 req/s, {clients} concurrent "
                 "clients, against MLServer's faster configuration (adaptive batching or not)", reason=reason),
        **target("aimaas_vs_mlserver_sequential", sequential_ratio, TARGET_AIMAAS_OVER_MLSERVER,
                 "the same, one client (one request in flight)", reason=reason),
        **target("batching_on_vs_off", batching_ratio, TARGET_BATCHING_ON_OVER_OFF,
                 f"AIMaaS REST predict req/s at {clients} concurrent clients, batching on over off (same node)"),
    }


REQUIRED = {"schema_version": int, "benchmark": str, "quick": bool, "machine": dict, "software": dict, "model": dict,
            "in_process": dict, "sequential": dict, "concurrent": dict, "targets": dict}


def validate_report(report: dict) -> list[str]:
    """Problems with a result document (empty: valid). Shape, not figures."""
    problems = [f"missing or mistyped key {key!r}" for key, kind in REQUIRED.items() if not isinstance(report.get(key), kind)]
    if problems:
        return problems
    if report["sequential"].get("mlserver") is None and not report.get("mlserver_error"):
        problems.append("sequential.mlserver is null without mlserver_error")
    for key in ("aimaas", "floor", "ratio_rps_aimaas_over_mlserver", "ratio_rps_aimaas_over_floor"):
        if key not in report["sequential"]:
            problems.append(f"sequential.{key} missing")
    for key in ("clients", "aimaas_batching_on", "aimaas_batching_off", "ratio_rps_batching_on_over_off",
                "ratio_rps_aimaas_over_mlserver_best"):
        if key not in report["concurrent"]:
            problems.append(f"concurrent.{key} missing")
    for name in ("aimaas_vs_mlserver_concurrent", "aimaas_vs_mlserver_sequential", "batching_on_vs_off"):
        entry = report["targets"].get(name)
        if not isinstance(entry, dict) or "met" not in entry or "measured" not in entry:
            problems.append(f"targets.{name} missing or incomplete")
    return problems


def _fmt(summary: dict | None) -> str:
    if not summary:
        return "n/a"
    return f"{summary['rps']} req/s (p50 {summary['p50_ms']} ms)"


def _verdict(entry: dict) -> str:
    return "not measured" if entry["met"] is None else ("met" if entry["met"] else "NOT met")


def headline(report: dict) -> str:
    """Lines to paste into an issue note: each figure next to its baseline, ratios, verdicts."""
    seq, conc, targets = report["sequential"], report["concurrent"], report["targets"]
    error = (report.get("mlserver_error") or "").splitlines()
    ml_na = f"n/a ({error[0][:120]})" if error else "n/a"
    clients = conc["clients"]
    floor = seq["floor"]
    lines = [
        f"model: {report['model']['architecture']} all-MiniLM-L6-v2 weights, {report['model']['texts']} texts of "
        f"{report['model']['words_per_text']['min']}-{report['model']['words_per_text']['max']} words; "
        f"{report['machine']['cpus']} cores" + (" (QUICK run: rough)" if report["quick"] else ""),
        f"sequential (1 client): AIMaaS gateway REST predict {_fmt(seq['aimaas'])} vs in-process tokenizer+ONNX Runtime "
        f"floor {_fmt(floor)} → {seq['ratio_rps_aimaas_over_floor']}x of the floor's req/s, "
        f"+{seq.get('aimaas_overhead_p50_ms')} ms p50",
        f"sequential (1 client): AIMaaS {_fmt(seq['aimaas'])} vs MLServer HF runtime REST "
        + (_fmt(seq["mlserver"]) if seq.get("mlserver") else ml_na)
        + f" → {seq['ratio_rps_aimaas_over_mlserver']}x (target >= {TARGET_AIMAAS_OVER_MLSERVER}x: "
        f"{_verdict(targets['aimaas_vs_mlserver_sequential'])})",
        f"{clients} clients: AIMaaS (batching on) {_fmt(conc['aimaas_batching_on'])} vs MLServer best "
        f"({conc.get('mlserver_best_config') or 'n/a'}) "
        + (_fmt(conc.get("mlserver_best")) if conc.get("mlserver_best") else ml_na)
        + f" → {conc['ratio_rps_aimaas_over_mlserver_best']}x (target >= {TARGET_AIMAAS_OVER_MLSERVER}x: "
        f"{_verdict(targets['aimaas_vs_mlserver_concurrent'])}); MLServer adaptive batching "
        f"{_fmt(conc.get('mlserver_adaptive_batching'))}, without {_fmt(conc.get('mlserver_no_batching'))}",
        f"{clients} clients: AIMaaS batching on {_fmt(conc['aimaas_batching_on'])} vs off "
        f"{_fmt(conc['aimaas_batching_off'])} → {conc['ratio_rps_batching_on_over_off']}x (target >= "
        f"{TARGET_BATCHING_ON_OVER_OFF}x: {_verdict(targets['batching_on_vs_off'])}); mean batch formed "
        f"{conc['aimaas_batching_on'].get('avg_server_batch_size')}",
    ]
    oip, node = seq.get("aimaas_oip"), seq.get("node_grpc")
    cpu = (seq["aimaas"].get("server_cpu_us_per_request") or {}), ((oip or {}).get("server_cpu_us_per_request") or {})
    if oip and node:
        lines.append(
            f"sequential p50 along the path: floor {floor['p50_ms']} ms, the node over gRPC {node['p50_ms']} ms, the gateway's "
            f"OIP REST endpoint {oip['p50_ms']} ms, its task endpoint {seq['aimaas']['p50_ms']} ms; gateway CPU per request: "
            f"task endpoint {cpu[0].get('gateway')} µs vs OIP {cpu[1].get('gateway')} µs (same deployment)")
    ceiling = report["in_process"].get("batch_ceiling")
    if ceiling:
        lines.append(
            f"in-process ONNX Runtime (1 thread, the node's setting): batch 1 {ceiling['batch_1_texts_per_s']} texts/s vs "
            f"batch {ceiling['batch']} {ceiling['batch_n_texts_per_s']} texts/s → {ceiling['ratio']}x (padding efficiency "
            f"{ceiling['padding_efficiency']}); without padding (the median text, {ceiling['median_text_tokens']} tokens, "
            f"x{ceiling['batch']}) {ceiling['ratio_without_padding']}x: what merging texts can give on this model at most")
    return "\n".join(lines)
