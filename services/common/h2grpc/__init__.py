"""gRPC over HTTP/2 on asyncio: the inference node's fast front end (see server.py for why)."""

from services.common.h2grpc.server import H2GrpcServer, ServicerContext

__all__ = ["H2GrpcServer", "ServicerContext"]
