"""`python -m services.registry` / `aimaas-registry`: run the registry from AIMAAS_* settings."""

from services.common.grpc_core import prefer_epoll_io


def main() -> None:
    prefer_epoll_io()  # before anything imports grpcio: gRPC core reads it once, at import
    from services.registry.app import main as run

    run()


if __name__ == "__main__":
    main()
