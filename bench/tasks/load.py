"""Closed-loop load: N concurrent keep-alive HTTP clients posting one text per request (or, for
the node itself, tritonclient.grpc.aio clients sending it as a BYTES tensor).

Run by bench/tasks/run.py as a subprocess, so client work sits in its own interpreter. Each
client has its own connection (plain asyncio streams, HTTP/1.1, head and body in one write) and
exactly one request in flight; client i starts at text i and walks through bench.tasks.model.TEXTS.
Every side gets the same client, so client cost is alike on both sides of each ratio. Requests
sent before `--start-at` are warm-up; requests that complete inside [start-at, start-at + duration]
are counted. A non-200 answer is an error (its body sampled).

Writes {"latencies_s": [...], "errors": n, "unfinished": n, "client_cpu_s": s, "error_samples": [...]} to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import time

import numpy as np

from bench.inference.load import wait_window
from bench.tasks import stats
from bench.tasks.model import TEXTS

REQUEST_TIMEOUT_S = 30.0


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status, length, close = stats.parse_response_head(head)
        body = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


async def client_loop(index: int, requests: list[bytes], host: str, port: int, start_at: float, end_at: float,
                      latencies: list[float], errors: list[str]) -> None:
    connection = Connection(host, port)
    perf = time.perf_counter
    position = index
    try:
        while True:
            now = time.time()
            if now >= end_at:
                break
            measured = now >= start_at
            data = requests[position % len(requests)]
            position += 1
            sent = perf()
            try:
                status, body = await asyncio.wait_for(connection.request(data), REQUEST_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - counted, never fatal
                await connection.close()
                if measured:
                    errors.append(f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
                await asyncio.sleep(0.01)
                continue
            elapsed = perf() - sent
            if status != 200:
                if measured:
                    errors.append(f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
                continue
            if measured and time.time() <= end_at:
                latencies.append(elapsed)
    finally:
        await connection.close()


class GrpcConnection:
    """The node itself over gRPC (tritonclient.grpc.aio, BYTES `text`, label and score outputs):
    what the gateway's hop adds is measured against it. `request` takes the text's index."""

    def __init__(self, url: str, model: str) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aioclient

        self.client = aioclient.InferenceServerClient(url)
        self.model = model
        self.inputs = []
        for text in TEXTS:
            tensor = grpcclient.InferInput("text", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
            self.inputs.append([tensor])
        self.outputs = [grpcclient.InferRequestedOutput("label"), grpcclient.InferRequestedOutput("score")]

    async def request(self, index: int) -> tuple[int, bytes]:
        await self.client.infer(self.model, self.inputs[index], outputs=self.outputs, client_timeout=REQUEST_TIMEOUT_S)
        return 200, b""

    async def close(self) -> None:
        await self.client.close()


async def grpc_client_loop(index: int, url: str, model: str, start_at: float, end_at: float,
                           latencies: list[float], errors: list[str]) -> None:
    connection = GrpcConnection(url, model)
    perf = time.perf_counter
    position = index
    try:
        while (now := time.time()) < end_at:
            sent = perf()
            try:
                await connection.request(position % len(TEXTS))
            except Exception as error:  # noqa: BLE001 - counted, never fatal
                if now >= start_at:
                    errors.append(f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
                await asyncio.sleep(0.01)
                continue
            finally:
                position += 1
            elapsed = perf() - sent
            if now >= start_at and time.time() <= end_at:
                latencies.append(elapsed)
    finally:
        await connection.close()


async def run(side: str, model: str, host: str, port: int, clients: int, start_at: float, duration: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    end_at = start_at + duration
    if side == stats.NODE_GRPC:
        tasks = [asyncio.ensure_future(grpc_client_loop(i, f"{host}:{port}", model, start_at, end_at, latencies, errors))
                 for i in range(clients)]
    else:
        requests = [stats.http_request(side, model, text, f"{host}:{port}") for text in TEXTS]
        tasks = [asyncio.ensure_future(client_loop(i, requests, host, port, start_at, end_at, latencies, errors))
                 for i in range(clients)]
    cpu_window, unfinished = await wait_window(tasks, start_at, end_at)
    return {"latencies_s": latencies, "errors": len(errors), "unfinished": unfinished, "client_cpu_s": cpu_window,
            "error_samples": sorted(set(errors))[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=(*stats.SIDES, stats.NODE_GRPC), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--start-at", type=float, required=True, help="time.time() at which the measured window opens")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    if not 0 < args.duration <= 3600 or not 0 < args.clients <= 1024:
        parser.error("duration must be in (0, 3600] s and clients in (0, 1024]")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run(args.side, args.model, args.host, args.port, args.clients, args.start_at, args.duration))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
