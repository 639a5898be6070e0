"""Gateway bench: REST (JSON and binary tensor extension) through the gateway vs direct gRPC to the node.

One run, one machine, every side next to its baseline:
  a mesh of real processes (etcd, registry, scheduler, one inference node), the bench MLP deployed on
  it, and a gateway process (the real GatewayApp: routing table from etcd, upstream replica choice)
  serving the REST edge of services.gateway.http_app. Clients (own process):
    grpc_direct  tritonclient.grpc to the node itself (the baseline)
    grpc_gateway tritonclient.grpc through the gateway's gRPC port (what the extra hop costs by itself)
    rest_binary  tritonclient.http through the gateway, binary tensor data for inputs and outputs
    rest_json    tritonclient.http through the gateway, JSON tensors both ways
  Each mode is measured sequentially (one client, batch 1: p50 latency and req/s) and with
  `--clients` concurrent closed-loop clients (throughput), in alternating rounds so drift on the
  machine hits every side alike. Target: rest_binary p50 <= 1.5x grpc_direct p50.

Usage: python -m bench.gateway.run [--quick] [--out bench/results/gateway.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import pathlib
import platform
import sys
import tempfile
import threading
import time

import numpy as np

from bench.inference import model as bench_model
from bench.inference.stats import latency_summary, ratio

SCHEMA_VERSION = 1
TARGET_REST_BINARY_P50_OVER_GRPC = 1.5
MODES = ("grpc_direct", "grpc_gateway", "rest_binary", "rest_json")


def log(message: str) -> None:
    print(f"[bench.gateway {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ pure parts


def ratios(results: dict[str, dict]) -> dict:
    """REST modes over the direct gRPC baseline: p50 latency ratios (lower is better) and req/s ratios."""
    base = results.get("grpc_direct") or {}
    out: dict[str, float | None] = {}
    hop = results.get("grpc_gateway") or {}
    for mode in ("rest_binary", "rest_json"):
        side = results.get(mode) or {}
        out[f"{mode}_p50_over_grpc"] = ratio(side.get("p50_ms"), base.get("p50_ms"))
        out[f"{mode}_rps_over_grpc"] = ratio(side.get("rps"), base.get("rps"))
        out[f"{mode}_p50_over_grpc_gateway"] = ratio(side.get("p50_ms"), hop.get("p50_ms"))
    out["grpc_gateway_p50_over_grpc"] = ratio(hop.get("p50_ms"), base.get("p50_ms"))
    return out


def target_entry(measured_p50_ratio: float | None) -> dict:
    return {
        "description": "REST binary p50 through the gateway <= 1.5x direct gRPC p50 to the node (sequential, batch 1)",
        "target": f"<= {TARGET_REST_BINARY_P50_OVER_GRPC}x",
        "measured": measured_p50_ratio,
        "met": None if measured_p50_ratio is None else measured_p50_ratio <= TARGET_REST_BINARY_P50_OVER_GRPC,
    }


def merge_rounds(rounds: list[tuple]) -> dict:
    """One summary from several measured rounds of (latencies, elapsed seconds, errors[, CPU seconds
    per process]); CPU becomes µs per answered request, per process."""
    latencies = [value for round_ in rounds for value in round_[0]]
    elapsed = sum(round_[1] for round_ in rounds)
    errors = sum(round_[2] for round_ in rounds)
    summary = latency_summary(latencies, elapsed_s=elapsed, errors=errors)
    cpu_rounds = [round_[3] for round_ in rounds if len(round_) > 3 and round_[3]]
    if cpu_rounds and latencies:
        summary["cpu_us_per_request"] = {
            name: round(sum(cpu[name] for cpu in cpu_rounds) / len(latencies) * 1e6, 1) for name in cpu_rounds[0]
        }
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--requests", type=int, default=None, help="sequential requests per mode and round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the throughput phase")
    parser.add_argument("--seconds", type=float, default=None, help="duration of each concurrent phase")
    parser.add_argument("--profile", default=None, help="write a cProfile of the gateway process here")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated subset of the modes to measure (e.g. rest_binary with --profile)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/gateway.json"))
    args = parser.parse_args(argv)
    args.requests = args.requests or (200 if args.quick else 2000)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.modes = tuple(mode for mode in MODES if mode in args.modes.split(","))
    if not args.modes:
        parser.error(f"--modes names none of {', '.join(MODES)}")
    return args


# ------------------------------------------------------------------------------------ clients


class ModeClient:
    """One blocking client of one mode (made on the thread that uses it: gevent sockets are per thread)."""

    def __init__(self, mode: str, node_address: str, gateway: tuple[str, str]) -> None:
        x = bench_model.sample_input(1, seed=1)
        self.mode = mode
        gateway_http, gateway_grpc = gateway
        if mode in ("grpc_direct", "grpc_gateway"):
            import tritonclient.grpc as tg

            self.client = tg.InferenceServerClient(node_address if mode == "grpc_direct" else gateway_grpc)
            tensor = tg.InferInput(bench_model.INPUT_NAME, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            self.inputs = [tensor]
            self.outputs = [tg.InferRequestedOutput(bench_model.OUTPUT_NAME)]
        else:
            import tritonclient.http as th

            binary = mode == "rest_binary"
            self.client = th.InferenceServerClient(gateway_http.removeprefix("http://"))
            tensor = th.InferInput(bench_model.INPUT_NAME, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            self.inputs = [tensor]
            self.outputs = [th.InferRequestedOutput(bench_model.OUTPUT_NAME, binary_data=binary)]

    def call(self) -> None:
        result = self.client.infer(bench_model.MODEL_NAME, self.inputs, outputs=self.outputs)
        if result.as_numpy(bench_model.OUTPUT_NAME).shape != (1, bench_model.CLASSES):
            raise RuntimeError("unexpected output shape")

    def close(self) -> None:
        self.client.close()


def process_cpu_probe(pid: int | None = None):
    """A callable giving the CPU seconds (user + system, all threads) used so far by process `pid`
    (this process when None)."""
    import psutil

    process = psutil.Process(pid)

    def cpu_seconds() -> float:
        times = process.cpu_times()
        return times.user + times.system

    return cpu_seconds


def sequential(mode: str, node: str, http: tuple[str, str], requests: int, warmup: int,
               cpu_probes: dict | None = None) -> tuple[list[float], float, int, dict[str, float]]:
    """`requests` calls back to back: (latencies, elapsed seconds, errors, CPU seconds each probed
    process spent meanwhile)."""
    client = ModeClient(mode, node, http)
    probes = cpu_probes or {}
    try:
        for _ in range(warmup):
            client.call()
        latencies, errors = [], 0
        perf = time.perf_counter
        cpu_before = {name: probe() for name, probe in probes.items()}
        started = perf()
        for _ in range(requests):
            t0 = perf()
            try:
                client.call()
            except Exception:  # noqa: BLE001 - counted, the bench goes on
                errors += 1
                continue
            latencies.append(perf() - t0)
        elapsed = perf() - started
        cpu = {name: probe() - cpu_before[name] for name, probe in probes.items()}
        return latencies, elapsed, errors, cpu
    finally:
        client.close()


def concurrent(mode: str, node: str, http: tuple[str, str], clients: int, seconds: float) -> tuple[list[float], float, int]:
    """`clients` closed-loop threads, each with its own client, for `seconds`."""
    results: list[tuple[list[float], int]] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker() -> None:
        client = ModeClient(mode, node, http)
        client.call()
        latencies, errors = [], 0
        start.wait()
        perf = time.perf_counter
        while perf() < stop_at[0]:
            t0 = perf()
            try:
                client.call()
                latencies.append(perf() - t0)
            except Exception:  # noqa: BLE001
                errors += 1
        client.close()
        with lock:
            results.append((latencies, errors))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + 3600
    start.wait()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return [v for lat, _ in results for v in lat], elapsed, sum(e for _, e in results)


# ------------------------------------------------------------------------------------ the mesh


def _gateway_process(settings_json: str, model: bytes, log_path: str, ready: multiprocessing.Queue,
                     stop: multiprocessing.Event, profile: str | None = None) -> None:
    """The real gateway (GatewayApp: REST + gRPC edges, routing from etcd, upstream choice), logging at
    INFO like a production process (one JSON access line per request) into a file."""
    sys.stderr = open(log_path, "a", buffering=1)  # noqa: SIM115 - the process's log for its lifetime
    from services.gateway.settings import GatewaySettings

    async def main() -> None:
        from tests.support.gateway import deploy, running_gateway

        settings = GatewaySettings.model_validate_json(settings_json)
        async with running_gateway(settings) as gateway:
            await deploy(gateway, bench_model.MODEL_NAME, [model], timeout=120)
            route = gateway.routing.table.find(bench_model.MODEL_NAME)
            ready.put(((gateway.http_url, gateway.grpc_address), route.versions[0].replicas[0].address))
            await serve_until(stop, profile)

    _run(main())


async def serve_until(stop, profile: str | None = None) -> None:
    """Let the process's event loop serve until `stop` (a multiprocessing Event) is set, under
    cProfile written to `profile` when given."""
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    while not stop.is_set():
        await asyncio.sleep(0.2)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)


def _run(coroutine) -> None:
    try:
        import uvloop

        uvloop.run(coroutine)
    except ImportError:
        asyncio.run(coroutine)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.support.gateway import start_mesh
    from tests.support.servers import EtcdProcess

    from services.common.settings import EtcdSettings

    model = bench_model.model_bytes()
    log("measuring the REST edge's CPU cost in-process")
    edge = edge_cpu_us()
    log(f"REST edge: {edge['best_us']} µs CPU per request on the inference lane, {edge['asgi_best_us']} µs via ASGI")
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        etcd = EtcdProcess(tmp / "etcd")
        etcd.start()
        mesh = gateway = None
        try:
            etcd_settings = EtcdSettings(endpoints=etcd.endpoint, namespace="/bench/aimaas/v1", session_ttl_seconds=5)
            log("starting registry, scheduler and one inference node")
            mesh = start_mesh(etcd_settings, tmp, nodes=("node-a",))
            settings = mesh.gateway_settings()
            settings.log.level = "INFO"
            ctx = multiprocessing.get_context("spawn")
            ready, stop = ctx.Queue(), ctx.Event()
            gateway = ctx.Process(target=_gateway_process,
                                  args=(settings.model_dump_json(), model, str(tmp / "gateway.log"), ready, stop,
                                        args.profile))
            gateway.start()
            log("gateway started; deploying the model")
            http, node = ready.get(timeout=180)
            log(f"gateway REST at {http[0]}, gRPC at {http[1]}; node gRPC at {node}")
            cpu_probes = {"client": process_cpu_probe(), "gateway": process_cpu_probe(gateway.pid),
                          "node": process_cpu_probe(mesh.nodes["node-a"].process.pid)}
            report = measure(args, node, http, edge, cpu_probes)
        finally:
            if gateway is not None:
                stop.set()
                gateway.join(60)
                if gateway.is_alive():
                    gateway.kill()
            if mesh is not None:
                mesh.stop()
            etcd.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(headline(report))
    log(f"wrote {args.out}")
    return 0


def measure(args: argparse.Namespace, node: str, http: tuple[str, str], edge: dict,
            cpu_probes: dict | None = None) -> dict:
    seq_rounds: dict[str, list] = {mode: [] for mode in args.modes}
    conc_rounds: dict[str, list] = {mode: [] for mode in args.modes}
    for round_index in range(args.rounds):
        order = args.modes if round_index % 2 == 0 else tuple(reversed(args.modes))
        for mode in order:
            seq_rounds[mode].append(sequential(mode, node, http, args.requests, warmup=50, cpu_probes=cpu_probes))
            summary = merge_rounds([seq_rounds[mode][-1]])
            log(f"round {round_index + 1} sequential {mode}: p50 {summary['p50_ms']} ms, {summary['rps']} req/s, "
                f"CPU µs/request {summary.get('cpu_us_per_request')}")
        for mode in order:
            conc_rounds[mode].append(concurrent(mode, node, http, args.clients, args.seconds))
            summary = merge_rounds([conc_rounds[mode][-1]])
            log(f"round {round_index + 1} {args.clients} clients {mode}: {summary['rps']} req/s, p50 {summary['p50_ms']} ms")
    seq = {mode: merge_rounds(rounds) for mode, rounds in seq_rounds.items()}
    conc = {mode: merge_rounds(rounds) for mode, rounds in conc_rounds.items()}
    seq_ratios = ratios(seq)
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "gateway",
        "quick": args.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "model": bench_model.describe(bench_model.model_bytes()),
        "setup": "etcd + registry + scheduler + 1 inference node (processes); the gateway (GatewayApp: "
                 "routing from etcd, upstream choice, services.gateway.http_app on uvicorn, access log at INFO) "
                 "in its own process; clients in the bench process: tritonclient.grpc to the node, "
                 "tritonclient.http to the gateway",
        "edge_cpu_us": edge,
        "sequential": {"requests_per_round": args.requests, "rounds": args.rounds, **seq, "ratios": seq_ratios},
        "concurrent": {"clients": args.clients, "seconds_per_round": args.seconds, **conc, "ratios": ratios(conc)},
        "targets": {"rest_binary_p50_vs_grpc": target_entry(seq_ratios["rest_binary_p50_over_grpc"])},
    }


def edge_cpu_us(requests: int = 2000, repeats: int = 5) -> dict:
    """The REST edge's own CPU cost per request, driven in-process without sockets by a
    binary-extension request, with a data plane that returns a prepared response: the inference lane
    (what serves a request that arrives whole; parse, edge steps, codec, access log) and the ASGI
    path (uvicorn's cycle left out; middleware, codec, access log). Process CPU time, best of `repeats`."""
    import io
    import logging

    import structlog

    from inference import grpc_predict_v2_pb2 as pb
    from services.common.auth import AuthSettings
    from services.common.auth.authenticator import Authenticator
    from services.gateway.http_app import build_http_app
    from services.gateway.settings import GatewayServerSettings, GatewaySettings
    from services.inference import tensors

    prepared = pb.ModelInferResponse(model_name=bench_model.MODEL_NAME, model_version="1")
    tensors.add_output(prepared, bench_model.OUTPUT_NAME, np.zeros((1, bench_model.CLASSES), np.float32))

    class PreparedDataPlane:
        async def model_infer(self, request, **_kwargs):
            response = pb.ModelInferResponse()
            response.CopyFrom(prepared)
            return response

    settings = GatewaySettings(gateway=GatewayServerSettings(auth=AuthSettings(enabled=False)))
    logger = structlog.wrap_logger(structlog.PrintLogger(io.StringIO()), processors=[structlog.processors.JSONRenderer()],
                                   wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    app = build_http_app(PreparedDataPlane(), Authenticator(None, settings.gateway.auth), settings, logger=logger)
    x = bench_model.sample_input(1, seed=1)
    header = json.dumps({
        "inputs": [{"name": bench_model.INPUT_NAME, "shape": [1, bench_model.FEATURES], "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": bench_model.OUTPUT_NAME, "parameters": {"binary_data": True}}],
    }).encode()
    body = header + x.tobytes()
    path = f"/v2/models/{bench_model.MODEL_NAME}/infer"
    headers = [(b"host", b"bench"), (b"inference-header-content-length", str(len(header)).encode()),
               (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    raw_request = b"".join([f"POST {path} HTTP/1.1\r\n".encode(), *(k + b": " + v + b"\r\n" for k, v in headers),
                            b"\r\n", body])
    date = [(b"date", b"Sun, 06 Dec 2026 00:00:00 GMT")]

    async def asgi_request() -> None:
        statuses = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(dict(scope), receive, send)
        if statuses != [200]:
            raise RuntimeError(f"edge answered {statuses}")

    async def lane_request() -> None:
        parsed = app.lane.parse(raw_request)
        if parsed is None:
            raise RuntimeError("the inference lane did not take the request")
        answers: list[bytes] = []
        await app.lane.serve(parsed[0], answers.append, date)
        if not answers or not answers[0].startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"the inference lane answered {answers[:1]}")

    async def run(one) -> list[float]:
        for _ in range(200):
            await one()
        per_request = []
        for _ in range(repeats):
            # CPU time, not wall time: what the code costs, not how long it waited for a core.
            started = time.process_time()
            for _ in range(requests):
                await one()
            per_request.append((time.process_time() - started) / requests * 1e6)
        return per_request

    lane = asyncio.run(run(lane_request))
    asgi = asyncio.run(run(asgi_request))
    return {"what": "REST edge in-process (no sockets, prepared data plane), binary request, batch 1; process CPU "
                    "time per request: the inference lane (best_us) and the ASGI path (asgi_best_us)",
            "best_us": round(min(lane), 1),
            "all_us": [round(v, 1) for v in lane],
            "asgi_best_us": round(min(asgi), 1),
            "asgi_all_us": [round(v, 1) for v in asgi]}


def headline(report: dict) -> str:
    seq, conc = report["sequential"], report["concurrent"]
    lines = ["mode          seq p50 ms  seq req/s  conc req/s  CPU µs/request (sequential)"]
    for mode in (mode for mode in MODES if mode in seq):
        cpu = seq[mode].get("cpu_us_per_request") or {}
        cpu_text = ", ".join(f"{name} {value}" for name, value in cpu.items())
        lines.append(f"{mode:<13} {seq[mode]['p50_ms']!s:>10} {seq[mode]['rps']!s:>10} {conc[mode]['rps']!s:>11}  {cpu_text}")
    r = seq["ratios"]
    lines.append(f"p50 ratio vs direct gRPC: rest_binary {r['rest_binary_p50_over_grpc']}x, rest_json "
                 f"{r['rest_json_p50_over_grpc']}x, gRPC through the gateway {r['grpc_gateway_p50_over_grpc']}x")
    lines.append(f"p50 ratio vs gRPC through the gateway: rest_binary {r['rest_binary_p50_over_grpc_gateway']}x")
    c = conc["ratios"]
    lines.append(f"throughput ratio vs direct gRPC ({conc['clients']} clients): rest_binary {c['rest_binary_rps_over_grpc']}x, "
                 f"rest_json {c['rest_json_rps_over_grpc']}x")
    lines.append(f"REST edge CPU per request (in-process, best of runs): {report['edge_cpu_us']['best_us']} µs on the "
                 f"inference lane, {report['edge_cpu_us'].get('asgi_best_us')} µs via ASGI")
    target = report["targets"]["rest_binary_p50_vs_grpc"]
    lines.append(f"target rest_binary p50 {target['target']}: measured {target['measured']}x, met={target['met']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
