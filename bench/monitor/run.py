"""Memory of the monitor under a synthetic report stream: RSS must stay flat (within 10 %) after warm-up.

A real etcd and the monitor as its own process (`python -m services.monitor`, as in production);
synthetic inference nodes stream ReportStats over long-lived client streams (a delta per model version
per report, with realistic latency sketches), model versions are rolled over during the run (old
series go idle and must be evicted), and a reader keeps querying (QueryMetrics, GetLoadSignal, the
dashboard's JSON and /metrics) so the read paths are exercised too.

Memory is set by the number of series and buckets, not by wall time; a full hour of coarse buckets
would take an hour to fill, so the run compresses time (`--window-scale`, default: the 1h window fills
during the first third of the run) while keeping production's bucket counts (61 fine buckets for 5m,
61 coarse for 1h). `--window-scale 1` runs in real time (then give it well over an hour).

RSS is sampled every second; after the warm-up (the first third), the figure is
(max - min) / min of RSS, and the ratio final / end-of-warm-up.

Usage: python -m bench.monitor.run [--duration 60] [--nodes 8] [--models 25] [--out bench/results/monitor.json]
       python -m bench.monitor.run --duration 600   # the full 10-minute run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import random
import subprocess
import sys
import tempfile
import time

import grpc
import httpx
import psutil

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc as mpb_grpc
from services.common.sketch import LatencySketch
from tests.support.servers import EtcdProcess, free_port


def sketch_pool(size: int, seed: int) -> list[tuple[mpb.LatencySketch, mpb.LatencySketch, int]]:
    """Pre-built (latency, queue time, count) sketches: lognormal latencies around 2–20 ms."""
    rng = random.Random(seed)
    pool = []
    for _ in range(size):
        count = rng.randint(20, 200)
        latency, queue = LatencySketch(), LatencySketch()
        median = rng.uniform(2_000, 20_000)
        latency.add_many(rng.lognormvariate(0, 0.6) * median for _ in range(count))
        queue.add_many(rng.expovariate(1 / 300) for _ in range(count))
        pool.append((latency.to_proto(), queue.to_proto(), count))
    return pool


async def reporter(stub, node: str, models: int, generation: list[int], interval: float, stop: asyncio.Event,
                   pool, counters: dict) -> None:
    rng = random.Random(node)
    call = stub.ReportStats()
    try:
        while not stop.is_set():
            end = time.time_ns()
            deltas = []
            for m in range(models):
                latency, queue, count = pool[rng.randrange(len(pool))]
                failures = rng.randint(0, count // 20)
                delta = mpb.StatsDelta(
                    model=f"model-{m}", version=generation[0] + (m % 3), success_count=count - failures,
                    failure_counts={"INVALID_ARGUMENT": failures} if failures else {}, latency=latency,
                    queue_time=queue, batch_sizes={1: count // 2, 4: count // 8}, in_flight=rng.randint(0, 8),
                )
                delta.interval_start.FromNanoseconds(end - int(interval * 1e9))
                delta.interval_end.FromNanoseconds(end)
                deltas.append(delta)
            await call.write(mpb.ReportStatsRequest(
                reporter_kind=mpb.REPORTER_KIND_INFERENCE_NODE, reporter_id=node, deltas=deltas,
                resources=mpb.ResourceUsage(cpu_percent=rng.uniform(0, 100), memory_used_bytes=1 << 33,
                                            memory_total_bytes=1 << 34),
            ))
            counters["deltas"] += len(deltas)
            await asyncio.sleep(interval)
        await call.done_writing()
        await call
    finally:
        call.cancel()


async def reader(stub, dashboard: str, metrics: str, stop: asyncio.Event, counters: dict) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            for window in (mpb.WINDOW_1M, mpb.WINDOW_5M, mpb.WINDOW_1H):
                await stub.QueryMetrics(mpb.QueryMetricsRequest(window=window))
            await stub.GetLoadSignal(mpb.GetLoadSignalRequest(model="model-0", version=1))
            (await client.get(dashboard)).raise_for_status()
            (await client.get(metrics)).raise_for_status()
            counters["reads"] += 1
            counters["read_round_max_s"] = max(counters["read_round_max_s"], time.perf_counter() - started)
            await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> dict:
    warmup = args.duration / 3
    # Production bucket counts, time compressed: the 1h ring fills (and idle series are evicted) within
    # 0.4 warm-ups; versions roll over every half warm-up, so the first roll-over's old series are gone
    # before the warm-up ends and the series count cycles from then on.
    scale = args.window_scale or min(1.0, warmup * 0.4 / 3600)
    fine = 5.0 * scale
    coarse = 60.0 * scale
    with tempfile.TemporaryDirectory() as tmp:
        etcd = EtcdProcess(pathlib.Path(tmp) / "etcd")
        etcd.start()
        grpc_port, metrics_port, dashboard_port = free_port(), free_port(), free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIMAAS_")},
            "AIMAAS_ETCD__ENDPOINTS": etcd.endpoint,
            "AIMAAS_LOG__LEVEL": "WARNING",
            "AIMAAS_MONITOR__GRPC_PORT": str(grpc_port),
            "AIMAAS_MONITOR__METRICS_PORT": str(metrics_port),
            "AIMAAS_MONITOR__DASHBOARD_PORT": str(dashboard_port),
            "AIMAAS_MONITOR__AUTH__ENABLED": "false",
            "AIMAAS_MONITOR__WINDOW_SCALE": repr(scale),
            "AIMAAS_MONITOR__FINE_BUCKET_SECONDS": repr(fine),
            "AIMAAS_MONITOR__COARSE_BUCKET_SECONDS": repr(coarse),
            "AIMAAS_MONITOR__EVALUATION_INTERVAL_SECONDS": "1",
        }
        process = subprocess.Popen([sys.executable, "-m", "services.monitor"], env=env)
        try:
            ps = psutil.Process(process.pid)
            address = f"127.0.0.1:{grpc_port}"
            async with grpc.aio.insecure_channel(address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                stub = mpb_grpc.MonitorServiceStub(channel)
                # One alert rule per kind, so evaluation runs over every series.
                for metric, threshold in ((mpb.ALERT_METRIC_ERROR_RATE, 0.5), (mpb.ALERT_METRIC_P99_LATENCY_MS, 500)):
                    await stub.CreateAlertRule(mpb.CreateAlertRuleRequest(rule=mpb.AlertRule(
                        name=f"bench {metric}", metric=metric, threshold=threshold, enabled=True)))
                stop = asyncio.Event()
                counters = {"deltas": 0, "reads": 0, "read_round_max_s": 0.0}
                generation = [1]
                pool = sketch_pool(64, seed=1)
                tasks = [
                    asyncio.create_task(reporter(stub, f"node-{n}", args.models, generation, args.interval, stop,
                                                 pool, counters))
                    for n in range(args.nodes)
                ]
                tasks.append(asyncio.create_task(reader(
                    stub, f"http://127.0.0.1:{dashboard_port}/api/overview",
                    f"http://127.0.0.1:{metrics_port}/metrics", stop, counters)))
                samples: list[tuple[float, int]] = []
                started = time.monotonic()
                next_rollover = started + warmup / 2
                while (elapsed := time.monotonic() - started) < args.duration:
                    samples.append((round(elapsed, 1), ps.memory_info().rss))
                    if time.monotonic() >= next_rollover:
                        generation[0] += 1  # new versions: the old series go idle and must be evicted
                        next_rollover += warmup / 2
                    for task in tasks:
                        if task.done():
                            task.result()
                    await asyncio.sleep(1.0)
                stop.set()
                await asyncio.gather(*tasks)
                series = len((await stub.QueryMetrics(mpb.QueryMetricsRequest())).samples)
        finally:
            process.terminate()
            process.wait(30)
            etcd.stop()
    after = [rss for t, rss in samples if t >= warmup]
    at_warmup = after[0]
    spread = (max(after) - min(after)) / min(after)
    return {
        "benchmark": "monitor-memory",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {
            "duration_s": args.duration, "warmup_s": round(warmup, 1), "nodes": args.nodes, "models": args.models,
            "report_interval_s": args.interval, "window_scale": scale, "fine_bucket_s": fine, "coarse_bucket_s": coarse,
        },
        "deltas_sent": counters["deltas"],
        "deltas_per_second": round(counters["deltas"] / args.duration, 1),
        "read_rounds": counters["reads"],
        # One round: QueryMetrics over all series for 1m, 5m and 1h, GetLoadSignal, the dashboard JSON, /metrics.
        "read_round_max_s": round(counters["read_round_max_s"], 3),
        "model_versions_at_end": series,
        "rss_mib": {
            "start": round(samples[0][1] / 2**20, 1),
            "end_of_warmup": round(at_warmup / 2**20, 1),
            "min_after_warmup": round(min(after) / 2**20, 1),
            "max_after_warmup": round(max(after) / 2**20, 1),
            "final": round(after[-1] / 2**20, 1),
        },
        "spread_after_warmup": round(spread, 4),
        "final_over_warmup": round(after[-1] / at_warmup, 4),
        "flat_within_10_percent": spread <= 0.10,
        "rss_timeline_mib": [(t, round(rss / 2**20, 1)) for t, rss in samples[:: max(1, len(samples) // 60)]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (600 for the full run)")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--models", type=int, default=25, help="model versions per node report")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between a node's reports")
    parser.add_argument("--window-scale", type=float, default=0.0, help="0: fill the 1h ring during warm-up")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/monitor.json"))
    args = parser.parse_args()
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k != "rss_timeline_mib"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
