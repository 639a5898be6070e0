"""Closed-loop load generator: N concurrent `tritonclient.grpc.aio` clients, batch-1 requests.

Run by bench/inference/run.py as one or more subprocesses so that client work sits in its own
interpreter(s). Each client has its own InferenceServerClient and keeps exactly one request in
flight. Clients send warm-up traffic until `--start-at` (a time.time() instant shared by all
worker processes), then count the requests that complete before `start-at + duration`.

Writes a JSON document to --out: {"latencies_s": [...], "errors": n, "unfinished": n, "client_cpu_s": s, "error_samples": [...]}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import time

import numpy as np


GRACE_S = 5.0


async def client_loop(url: str, model: str, version: str, data: np.ndarray, start_at: float, end_at: float,
                      latencies: list[float], errors: list[str]) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    try:
        infer_input = grpcclient.InferInput("input", list(data.shape), "FP32")
        infer_input.set_data_from_numpy(data)
        inputs = [infer_input]
        perf = time.perf_counter
        while True:
            now = time.time()
            if now >= end_at:
                break
            measured = now >= start_at
            sent = perf()
            try:
                await client.infer(model, inputs, model_version=version, client_timeout=30)
            except Exception as error:  # noqa: BLE001 - counted, never fatal
                if measured:
                    errors.append(type(error).__name__ + ": " + str(error).splitlines()[0][:200])
                await asyncio.sleep(0.001)
                continue
            elapsed = perf() - sent
            if measured and time.time() <= end_at:
                latencies.append(elapsed)
    finally:
        await client.close()


async def run(url: str, model: str, version: str, clients: int, start_at: float, duration: float, seed: int,
              features: int = 64) -> dict:
    """Requests that complete inside the window count; failures of requests sent inside it are
    errors; requests still unanswered GRACE_S after the window closes are cancelled and counted."""
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    errors: list[str] = []
    end_at = start_at + duration
    tasks = [
        asyncio.ensure_future(client_loop(url, model, version, rng.standard_normal((1, features)).astype(np.float32),
                                          start_at, end_at, latencies, errors))
        for _ in range(clients)
    ]
    cpu_window, unfinished = await wait_window(tasks, start_at, end_at)
    return {"latencies_s": latencies, "errors": len(errors), "unfinished": unfinished,
            "client_cpu_s": cpu_window, "error_samples": sorted(set(errors))[:5]}


async def wait_window(tasks: list[asyncio.Future], start_at: float, end_at: float) -> tuple[float, int]:
    """Wait out a measured window [start_at, end_at] (time.time()) of running client `tasks`:
    (this process's CPU seconds inside the window, warm-up excluded; how many tasks were still
    running GRACE_S after it closed, which are then cancelled)."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu_start = time.process_time()
    await asyncio.sleep(max(0.0, end_at - time.time()))
    cpu_window = time.process_time() - cpu_start
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, end_at + GRACE_S - time.time()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=10)
    return cpu_window, len(pending)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--version", default="1")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--start-at", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", type=int, default=64, help="input width of the model")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    if not 0 < args.duration <= 3600 or not 0 < args.clients <= 4096:
        parser.error("duration must be in (0, 3600] s and clients in (0, 4096]")
    result = asyncio.run(run(args.url, args.model, args.version, args.clients, args.start_at, args.duration, args.seed,
                             args.features))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
