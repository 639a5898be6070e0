"""The ceiling of a Python grpc.aio server on this machine: a bare ModelInfer servicer.

It answers every ModelInfer with one response prepared at start (no model run, no validation, no
interceptors), on uvloop like the AIMaaS node, so the (a) target can be judged against what the
Python gRPC stack itself allows: no servicer written on it can be faster than this one.

Usage: python -m bench.inference.ceiling_server --port N [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from bench.inference import model as bench_model
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc
from services.common.aio import run_service

STOP_GRACE_S = 0.5


def prepared_response() -> pb.ModelInferResponse:
    """What the bench model would answer for one row, with zeros for its values."""
    output = pb.ModelInferResponse.InferOutputTensor(name=bench_model.OUTPUT_NAME, datatype="FP32",
                                                      shape=[1, bench_model.CLASSES])
    return pb.ModelInferResponse(model_name=bench_model.MODEL_NAME, model_version=bench_model.MODEL_VERSION,
                                 outputs=[output], raw_output_contents=[bytes(4 * bench_model.CLASSES)])


class CeilingServicer(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self._response = prepared_response()

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=True)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        if not request.id:
            return self._response  # the common bench case: nothing copied at all
        response = pb.ModelInferResponse()
        response.CopyFrom(self._response)
        response.id = request.id
        return response


async def serve(host: str, port: int) -> None:
    # Same socket options as the node's GrpcService; no interceptors: this is the best case.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(CeilingServicer(), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"cannot bind {host}:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(STOP_GRACE_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    run_service(serve(args.host, args.port))


if __name__ == "__main__":
    main()
