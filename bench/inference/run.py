"""Inference serving bench: AIMaaS vs MLServer, batching on vs off, server overhead.

All figures come from one run on one machine, each next to its baseline:
  0. in-process ONNX Runtime on the same model (per-call time at batch 1, 8, 32, 64);
  (a) sequential single-client `tritonclient.grpc` req/s and latency, batch 1: AIMaaS vs MLServer
      1.7.1 (own virtualenv, minimal onnxruntime runtime in bench/inference/mlserver_runtime/);
      target aimaas/mlserver >= 2x;
  (a') in the same rounds, a bare grpc.aio servicer that answers ModelInfer with a prepared response
      (bench/inference/ceiling_server.py): the most the Python gRPC stack allows on this machine;
  (b) 64 concurrent closed-loop clients (tritonclient.grpc.aio), batch-1 requests: AIMaaS with
      dynamic batching on vs off (two server processes); target on/off >= 3x;
  (c) server overhead per request: AIMaaS p50 latency from (a) minus in-process ONNX Runtime p50 at
      batch 1.
Servers run as their own processes on free 127.0.0.1 ports; servers are measured in alternating
rounds so that drift on the machine hits every side alike.

Usage: python -m bench.inference.run [--quick] [--out bench/results/inference.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.inference import model as bench_model
from bench.inference import servers as bench_servers
from bench.inference.stats import (
    SCHEMA_VERSION, call_summary, latency_summary, overhead_section, ratio, targets_section, validate_report,
)
from tests.support.servers import free_port

IN_PROCESS_BATCHES = [1, 8, 32, 64]


def log(message: str) -> None:
    print(f"[bench.inference {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- baseline 0

def measure_in_process(data: bytes, batches: list[int], calls: int, warmup: int) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    features = session.get_inputs()[0].shape[1]
    per_batch = []
    perf = time.perf_counter
    for batch in batches:
        feeds = {bench_model.INPUT_NAME: bench_model.sample_input(batch, seed=batch, features=features)}
        for _ in range(warmup):
            session.run(None, feeds)
        durations = []
        for _ in range(calls):
            started = perf()
            session.run(None, feeds)
            durations.append(perf() - started)
        summary = call_summary(durations)
        summary["batch"] = batch
        summary["p50_us_per_row"] = round(summary["p50_us"] / batch, 3)
        per_batch.append(summary)
        log(f"in-process onnxruntime batch {batch}: p50 {summary['p50_us']} µs")
    return {
        "what": "onnxruntime.InferenceSession.run on the same model bytes, default session options, CPU provider",
        "onnxruntime_version": ort.__version__,
        "per_batch": per_batch,
    }


# --------------------------------------------------------------------------- (a) sequential

class SequentialClient:
    """One synchronous tritonclient.grpc client, one request in flight, batch 1."""

    def __init__(self, url: str, data: np.ndarray) -> None:
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        infer_input = grpcclient.InferInput(bench_model.INPUT_NAME, list(data.shape), "FP32")
        infer_input.set_data_from_numpy(data)
        self.inputs = [infer_input]

    def infer_once(self) -> np.ndarray:
        result = self.client.infer(bench_model.MODEL_NAME, self.inputs, model_version=bench_model.MODEL_VERSION,
                                   client_timeout=30)
        return result.as_numpy(bench_model.OUTPUT_NAME)

    def run(self, count: int, max_errors: int = 10) -> tuple[list[float], float, list[str]]:
        """`count` requests back to back: (latencies of the successful ones, elapsed, errors).

        Stops early after `max_errors` failures (a wedged server must not stall the bench)."""
        infer = self.client.infer
        name, version, inputs = bench_model.MODEL_NAME, bench_model.MODEL_VERSION, self.inputs
        perf = time.perf_counter
        latencies: list[float] = []
        errors: list[str] = []
        started = perf()
        for _ in range(count):
            sent = perf()
            try:
                infer(name, inputs, model_version=version, client_timeout=10)
            except Exception as error:  # noqa: BLE001 - counted and reported
                errors.append(str(error).splitlines()[0][:200])
                if len(errors) >= max_errors:
                    break
                continue
            latencies.append(perf() - sent)
        return latencies, perf() - started, errors

    def close(self) -> None:
        self.client.close()


def inference_counts(url: str, model: str = bench_model.MODEL_NAME) -> tuple[int, int] | None:
    """(inference_count, execution_count) of the bench model from ModelStatistics, if served."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, bench_model.MODEL_VERSION, as_json=True,
                                                client_timeout=10)
        entry = stats["model_stats"][0]
        return int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))
    except Exception:  # noqa: BLE001 - statistics are a bonus, not a requirement of the bench
        return None
    finally:
        client.close()


# --------------------------------------------------------------------------- (b) concurrent

def concurrent_round(server: bench_servers.ServerProcess, workdir: pathlib.Path, clients: int, procs: int,
                     duration: float, warmup: float, tag: str, model: str = bench_model.MODEL_NAME,
                     features: int = bench_model.FEATURES) -> dict:
    """Run `clients` closed-loop aio clients spread over `procs` worker processes.

    Returns latencies of requests completed inside the window, errors, unanswered requests, and the
    CPU seconds the clients and the server spent inside the window.
    """
    start_at = time.time() + warmup
    end_at = start_at + duration
    workers = []
    try:
        for index in range(procs):
            share = clients // procs + (1 if index < clients % procs else 0)
            out = workdir / f"load-{tag}-{index}.json"
            argv = [sys.executable, "-m", "bench.inference.load", "--url", server.url, "--model", model,
                    "--features", str(features), "--clients", str(share), "--start-at", repr(start_at), "--duration", str(duration),
                    "--seed", str(index), "--out", str(out)]
            workers.append((subprocess.Popen(argv, cwd=bench_servers.REPO_ROOT, stdin=subprocess.DEVNULL), out))
        time.sleep(max(0.0, start_at - time.time()))
        server_cpu_start = server.cpu_seconds()
        time.sleep(max(0.0, end_at - time.time()))
        server_cpu_end = server.cpu_seconds()
        result = {"latencies_s": [], "errors": 0, "unanswered": 0, "client_cpu_s": 0.0, "error_samples": [],
                  "server_cpu_s": None if server_cpu_start is None or server_cpu_end is None
                  else server_cpu_end - server_cpu_start}
        for worker, out in workers:
            code = worker.wait(timeout=duration + 120)
            if code != 0:
                raise RuntimeError(f"load worker exited with {code}")
            part = json.loads(out.read_text())
            result["latencies_s"] += part["latencies_s"]
            result["errors"] += part["errors"]
            result["unanswered"] += part["unfinished"]
            result["client_cpu_s"] += part["client_cpu_s"]
            result["error_samples"] += part["error_samples"]
        return result
    finally:
        for worker, _ in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)


# --------------------------------------------------------------------------- report helpers

def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": None,
        "memory_gib": None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        import psutil
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    return info


def software_info(mlserver_venv: pathlib.Path) -> dict:
    import grpc
    import onnxruntime
    import tritonclient

    commit = None
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=bench_servers.REPO_ROOT, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "services"], capture_output=True, text=True,
                               cwd=bench_servers.REPO_ROOT, timeout=10).stdout.strip()
        commit = head + ("+uncommitted services/ changes" if dirty else "")
    return {
        "aimaas_commit": commit,
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tritonclient": getattr(tritonclient, "__version__", None) or _dist_version("tritonclient"),
        "mlserver_venv": str(mlserver_venv),
        "mlserver_and_its_onnxruntime": bench_servers.mlserver_version(mlserver_venv),
    }


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(name)
    return None


def server_defaults() -> dict:
    with contextlib.suppress(Exception):
        from services.inference.settings import BatchingDefaults

        return BatchingDefaults().model_dump()
    return {}


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run (figures are rough)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/inference.json"))
    parser.add_argument("--mlserver-venv", type=pathlib.Path, default=bench_servers.DEFAULT_MLSERVER_VENV)
    parser.add_argument("--skip-mlserver", action="store_true", help="AIMaaS-side figures only")
    parser.add_argument("--skip-ceiling", action="store_true", help="no bare grpc.aio ceiling server in (a)")
    parser.add_argument("--requests", type=int, help="sequential measured requests per server (default 3000; quick 300)")
    parser.add_argument("--warmup-requests", type=int, help="sequential warm-up requests per server (default 500; quick 50)")
    parser.add_argument("--rounds", type=int, help="alternating measurement rounds (default 3; quick 1)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients in (b)")
    parser.add_argument("--client-procs", type=int, default=1, help="worker processes the (b) clients are spread over")
    parser.add_argument("--duration", type=float, help="seconds measured per (b) round (default 10; quick 2)")
    parser.add_argument("--hidden", type=int, default=bench_model.DEFAULT_HIDDEN,
                        help="hidden width of the MLP (a wider one shows what batching does for compute-bound models)")
    parser.add_argument("--batching-features", type=int, default=bench_model.DEFAULT_BATCHING_FEATURES,
                        help="input width of the (b) model")
    parser.add_argument("--batching-hidden", type=int, default=bench_model.DEFAULT_BATCHING_HIDDEN,
                        help="hidden width of the (b) model")
    parser.add_argument("--max-batch-size", type=int, help="AIMaaS batcher max batch size (default: server default)")
    parser.add_argument("--max-queue-delay-us", type=int, help="AIMaaS batcher max queue delay (default: server default)")
    args = parser.parse_args(argv)
    args.requests = args.requests or (300 if args.quick else 3000)
    args.warmup_requests = args.warmup_requests if args.warmup_requests is not None else (50 if args.quick else 500)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    if not (1 <= args.rounds <= 20 and 1 <= args.requests <= 1_000_000 and 0 < args.duration <= 600
            and 1 <= args.clients <= 4096 and 1 <= args.client_procs <= args.clients):
        parser.error("out-of-range --rounds/--requests/--duration/--clients/--client-procs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = bench_model.model_bytes(args.hidden)
    wide = bench_model.model_bytes(args.batching_hidden, args.batching_features)
    batching_defaults = server_defaults()
    max_batch = args.max_batch_size or batching_defaults.get("max_batch_size", 32)
    max_delay = args.max_queue_delay_us if args.max_queue_delay_us is not None else batching_defaults.get("max_queue_delay_us", 500)

    report: dict = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "inference serving: AIMaaS vs MLServer (sequential), batching on vs off (64 clients), server overhead",
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine_info(),
        "software": software_info(args.mlserver_venv),
        "model": bench_model.describe(data, args.hidden),
        "model_concurrent": bench_model.describe(wide, args.batching_hidden, args.batching_features,
                                                 bench_model.BATCHING_MODEL_NAME),
    }

    calls = 2000 if args.quick else 20000
    report["in_process_onnxruntime"] = measure_in_process(data, IN_PROCESS_BATCHES, calls, warmup=calls // 10)
    in_process_b1 = report["in_process_onnxruntime"]["per_batch"][0]["p50_us"]
    report["in_process_onnxruntime_concurrent_model"] = measure_in_process(
        wide, [1, 32], max(20, calls // 100), warmup=max(5, calls // 1000))

    with tempfile.TemporaryDirectory(prefix="aimaas-bench-inference-") as tmp, contextlib.ExitStack() as stack:
        workdir = pathlib.Path(tmp)
        repository = bench_model.write_aimaas_repository(workdir / "aimaas-repo", data,
                                                         {bench_model.BATCHING_MODEL_NAME: wide})
        batching_env = {"max_batch_size": max_batch, "max_queue_delay_us": max_delay}
        on = bench_servers.aimaas_server("aimaas-batching-on", repository, workdir, batching=True, **batching_env)
        off = bench_servers.aimaas_server("aimaas-batching-off", repository, workdir, batching=False, **batching_env)
        # The same node on grpcio's asyncio server: what the node's own front end is worth.
        grpcio = None if args.skip_ceiling else bench_servers.aimaas_server(
            "aimaas-grpcio-frontend", repository, workdir, batching=True, frontend="grpcio", **batching_env)
        started = {}
        ceiling = None if args.skip_ceiling else bench_servers.ceiling_server(workdir)
        for server in (on, off, grpcio, ceiling):
            if server is not None:
                stack.enter_context(server)
        for server in (on, off, grpcio):
            if server is None:
                continue
            started[server.name] = round(server.wait_ready(bench_model.MODEL_NAME, bench_model.MODEL_VERSION), 2)
            server.wait_ready(bench_model.BATCHING_MODEL_NAME, bench_model.MODEL_VERSION)
            log(f"{server.name} ready on {server.url} after {started[server.name]} s")
        if ceiling is not None:
            # It says ready for any model: the wait is only for its port.
            started[ceiling.name] = round(ceiling.wait_ready(bench_model.MODEL_NAME, bench_model.MODEL_VERSION), 2)
            log(f"{ceiling.name} ready on {ceiling.url} after {started[ceiling.name]} s")

        mlserver = None
        mlserver_error = None
        if args.skip_mlserver:
            mlserver_error = "skipped (--skip-mlserver)"
        else:
            try:
                ml_grpc, ml_http = free_port(), free_port()
                ml_repo = bench_model.write_mlserver_repository(workdir / "mlserver-repo", data, ml_grpc, ml_http)
                candidate = bench_servers.mlserver_server(ml_repo, workdir, args.mlserver_venv, ml_grpc)
                stack.callback(candidate.stop)
                candidate.start()
                started["mlserver"] = round(candidate.wait_ready(bench_model.MODEL_NAME, bench_model.MODEL_VERSION, timeout=120), 2)
                log(f"mlserver ready on {candidate.url} after {started['mlserver']} s")
                mlserver = candidate
            except bench_servers.ServerStartError as error:
                mlserver_error = str(error)
                log(f"MLServer unavailable, AIMaaS-side figures only: {mlserver_error.splitlines()[0]}")

        # ---- (a) sequential, alternating rounds
        sample = bench_model.sample_input(1, seed=42)
        expected = bench_model_run(data, sample)
        seq_servers = [server for server in (on, off, grpcio, ceiling, mlserver) if server is not None]
        clients = {server.name: SequentialClient(server.url, sample) for server in seq_servers}
        seq_lat = {server.name: [] for server in seq_servers}
        seq_elapsed = dict.fromkeys(clients, 0.0)
        seq_cpu = dict.fromkeys(clients, 0.0)
        seq_errors: dict[str, list[str]] = {name: [] for name in clients}
        correct = {}
        try:
            for server in seq_servers:
                got = clients[server.name].infer_once()
                if server is not ceiling:  # the ceiling runs no model: its zeros are not an answer to check
                    correct[server.name] = bool(got is not None and got.shape == expected.shape
                                                and np.allclose(got, expected, rtol=1e-5, atol=1e-6))
                clients[server.name].run(args.warmup_requests)
            per_round = max(1, args.requests // args.rounds)
            for round_index in range(args.rounds):
                for server in seq_servers:
                    cpu_before = server.cpu_seconds()
                    latencies, elapsed, errors = clients[server.name].run(per_round)
                    seq_errors[server.name] += errors
                    cpu_after = server.cpu_seconds()
                    seq_lat[server.name] += latencies
                    seq_elapsed[server.name] += elapsed
                    if cpu_before is not None and cpu_after is not None:
                        seq_cpu[server.name] += cpu_after - cpu_before
                    log(f"(a) round {round_index + 1}/{args.rounds} {server.name}: {len(latencies) / elapsed:.0f} req/s"
                        + (f", {len(errors)} errors" if errors else ""))
        finally:
            for client in clients.values():
                client.close()

        def seq_summary(server) -> dict:
            summary = latency_summary(seq_lat[server.name], seq_elapsed[server.name], len(seq_errors[server.name]))
            if seq_errors[server.name]:
                summary["error_samples"] = sorted(set(seq_errors[server.name]))[:5]
            summary["server_cpu_us_per_request"] = round(seq_cpu[server.name] / max(1, len(seq_lat[server.name])) * 1e6, 1)
            if server.name in correct:
                summary["output_matches_in_process"] = correct[server.name]
            return summary

        aimaas_seq = seq_summary(on)
        aimaas_seq_off = seq_summary(off)
        mlserver_seq = seq_summary(mlserver) if mlserver else None
        ceiling_seq = None if ceiling is None else {
            **seq_summary(ceiling),
            "what": ("bench/inference/ceiling_server.py: a grpc.aio GRPCInferenceService servicer on uvloop whose "
                     "ModelInfer returns one response prepared at start (no model, no validation, no interceptors); "
                     "same client and rounds: the most a node on grpcio's asyncio server could do"),
        }
        grpcio_seq = None if grpcio is None else {
            **seq_summary(grpcio),
            "what": "the AIMaaS node (batching on) with AIMAAS_INFERENCE__GRPC_FRONTEND=grpcio: grpc.aio's server",
        }
        seq_ratio = ratio(aimaas_seq["rps"], mlserver_seq and mlserver_seq["rps"])
        report["sequential"] = {
            "what": "one synchronous tritonclient.grpc client, one request in flight, batch 1, FP32 [1,64] as raw contents",
            "requests_per_server": per_round * args.rounds,
            "warmup_requests_per_server": args.warmup_requests,
            "rounds": args.rounds,
            "aimaas": {**aimaas_seq, "config": (f"batching on, max_batch_size {max_batch}, max_queue_delay_us {max_delay}"
                                                + (" (server defaults)" if args.max_batch_size is None
                                                   and args.max_queue_delay_us is None else ""))},
            "aimaas_batching_off": aimaas_seq_off,
            "mlserver": mlserver_seq,
            "mlserver_error": mlserver_error,
            "ratio_rps_aimaas_over_mlserver": seq_ratio,
            "ratio_rps_aimaas_batching_off_over_mlserver": ratio(aimaas_seq_off["rps"], mlserver_seq and mlserver_seq["rps"]),
            "ratio_p50_latency_mlserver_over_aimaas": ratio(mlserver_seq and mlserver_seq["p50_ms"], aimaas_seq["p50_ms"]),
            "grpc_aio_ceiling": ceiling_seq,
            "ratio_rps_ceiling_over_mlserver": ratio(ceiling_seq and ceiling_seq["rps"], mlserver_seq and mlserver_seq["rps"]),
            "aimaas_over_grpc_aio_ceiling": ratio(aimaas_seq["rps"], ceiling_seq and ceiling_seq["rps"]),
            "aimaas_grpcio_frontend": grpcio_seq,
            "ratio_rps_aimaas_grpcio_frontend_over_mlserver": ratio(grpcio_seq and grpcio_seq["rps"],
                                                                    mlserver_seq and mlserver_seq["rps"]),
            "ratio_rps_aimaas_over_aimaas_grpcio_frontend": ratio(aimaas_seq["rps"], grpcio_seq and grpcio_seq["rps"]),
        }
        for server in (mlserver, ceiling, grpcio):
            if server is not None:
                server.stop()  # (b) involves AIMaaS only: give it the whole machine.

        # ---- (b) concurrent, batching on vs off, alternating rounds
        rounds: dict[str, list[dict]] = {on.name: [], off.name: []}
        counts_before = {server.name: inference_counts(server.url, bench_model.BATCHING_MODEL_NAME) for server in (on, off)}
        warmup_s = 3.0 if args.quick else 5.0
        for round_index in range(args.rounds):
            for server in (on, off):
                result = concurrent_round(server, workdir, args.clients, args.client_procs, args.duration, warmup_s,
                                          f"{server.name}-{round_index}", bench_model.BATCHING_MODEL_NAME,
                                          args.batching_features)
                rounds[server.name].append(result)
                log(f"(b) round {round_index + 1}/{args.rounds} {server.name}: "
                    f"{len(result['latencies_s']) / args.duration:.0f} req/s, {result['errors']} errors, "
                    f"{result['unanswered']} unanswered")
        counts_after = {server.name: inference_counts(server.url, bench_model.BATCHING_MODEL_NAME) for server in (on, off)}

        def conc_summary(server) -> dict:
            results = rounds[server.name]
            window = args.duration * args.rounds
            latencies = [lat for result in results for lat in result["latencies_s"]]
            summary = latency_summary(latencies, window, sum(r["errors"] for r in results))
            # Requests still unanswered 5 s after a window closed (then cancelled by the client).
            summary["unanswered"] = sum(r["unanswered"] for r in results)
            summary["rps_per_round"] = [round(len(r["latencies_s"]) / args.duration, 1) for r in results]
            samples = sorted({sample for r in results for sample in r["error_samples"]})
            if samples:
                summary["error_samples"] = samples[:5]
            # Where the machine's cores went during the measured windows.
            done = max(1, len(latencies))
            client_cpu = sum(r["client_cpu_s"] for r in results)
            summary["client_cpu_cores_busy"] = round(client_cpu / window, 2)
            summary["client_cpu_us_per_request"] = round(client_cpu / done * 1e6, 1)
            if all(r["server_cpu_s"] is not None for r in results):
                server_cpu = sum(r["server_cpu_s"] for r in results)
                summary["server_cpu_cores_busy"] = round(server_cpu / window, 2)
                summary["server_cpu_us_per_request"] = round(server_cpu / done * 1e6, 1)
            before, after = counts_before[server.name], counts_after[server.name]
            if before and after and after[1] > before[1]:
                # Includes warm-up traffic: a property of the server's batching, not a per-window figure.
                summary["avg_server_batch_size"] = round((after[0] - before[0]) / (after[1] - before[1]), 2)
            return summary

        on_summary, off_summary = conc_summary(on), conc_summary(off)
        conc_ratio = ratio(on_summary["rps"], off_summary["rps"])
        report["concurrent"] = {
            "model": bench_model.BATCHING_MODEL_NAME,
            "what": (f"{args.clients} closed-loop tritonclient.grpc.aio clients (one channel each, one request in flight "
                     f"each, batch 1) in {args.client_procs} client process(es), sharing the machine with the server"),
            "clients": args.clients,
            "client_processes": args.client_procs,
            "duration_s_per_round": args.duration,
            "warmup_s_per_round": warmup_s,
            "rounds": args.rounds,
            "batching_on": {**on_summary, "max_batch_size": max_batch, "max_queue_delay_us": max_delay},
            "batching_off": off_summary,
            "ratio_rps_on_over_off": conc_ratio,
            "ratio_p50_latency_off_over_on": ratio(off_summary["p50_ms"], on_summary["p50_ms"]),
        }

    # ---- (c) overhead
    report["server_overhead"] = overhead_section(
        aimaas_seq["p50_ms"], in_process_b1, aimaas_batching_off_p50_ms=aimaas_seq_off["p50_ms"],
        mlserver_p50_ms=mlserver_seq["p50_ms"] if mlserver_seq else None)
    report["server_startup_s"] = started
    report["targets"] = targets_section(seq_ratio, conc_ratio, report["server_overhead"]["overhead_us"],
                                        clients=args.clients, mlserver_error=mlserver_error)
    # Other work on the machine skews every side; alternating rounds spread it, this says how much there was.
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    problems = validate_report(report)
    if problems:
        raise RuntimeError(f"report failed its own schema: {problems}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(headline(report))
    print(f"wrote {args.out}")
    return 0


def headline(report: dict) -> str:
    """A few lines to paste into a note: every figure next to its baseline."""
    seq, conc, over, targets = report["sequential"], report["concurrent"], report["server_overhead"], report["targets"]
    ml, ceiling, grpcio = seq["mlserver"], seq["grpc_aio_ceiling"], seq.get("aimaas_grpcio_frontend")

    def verdict(name: str) -> str:
        met = targets[name]["met"]
        return "not measured" if met is None else ("met" if met else "NOT met")

    lines = [
        f"(a) sequential batch 1: AIMaaS {seq['aimaas']['rps']} req/s (p50 {seq['aimaas']['p50_ms']} ms, "
        f"p99 {seq['aimaas']['p99_ms']} ms) vs MLServer "
        + (f"{ml['rps']} req/s (p50 {ml['p50_ms']} ms, p99 {ml['p99_ms']} ms)" if ml else f"n/a ({(seq['mlserver_error'] or '').splitlines()[0]})")
        + f" → {seq['ratio_rps_aimaas_over_mlserver']}x (target >= 2x: {verdict('sequential_vs_mlserver')})",
        "(a') grpcio: " + (
            f"the node on grpcio's server {grpcio['rps']} req/s → "
            + (f"{seq['ratio_rps_aimaas_grpcio_frontend_over_mlserver']}x MLServer" if ml else "MLServer n/a")
            + f" (the h2 front end: {seq['ratio_rps_aimaas_over_aimaas_grpcio_frontend']}x it); "
            f"a bare grpc.aio servicer with a prepared response {ceiling['rps']} req/s → "
            + (f"{seq['ratio_rps_ceiling_over_mlserver']}x MLServer" if ml else "MLServer n/a")
            + f"; AIMaaS {seq['aimaas_over_grpc_aio_ceiling']}x it"
            if ceiling and grpcio else "not measured (--skip-ceiling)"),
        f"(b) {conc['clients']} clients: batching on {conc['batching_on']['rps']} req/s (p50 {conc['batching_on']['p50_ms']} ms, "
        f"p99 {conc['batching_on']['p99_ms']} ms) vs off {conc['batching_off']['rps']} req/s (p50 {conc['batching_off']['p50_ms']} ms, "
        f"p99 {conc['batching_off']['p99_ms']} ms) → {conc['ratio_rps_on_over_off']}x (target >= 3x: {verdict('batching_on_vs_off')})",
        f"(c) overhead: AIMaaS p50 {over['aimaas_p50_us']} µs − in-process ONNX Runtime p50 {over['in_process_p50_us']} µs "
        f"= {over['overhead_us']} µs (MLServer: {over['mlserver_overhead_us']} µs)",
    ]
    return "\n".join(lines)


def bench_model_run(data: bytes, sample: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run([bench_model.OUTPUT_NAME], {bench_model.INPUT_NAME: sample})[0]


if __name__ == "__main__":
    sys.exit(main())
