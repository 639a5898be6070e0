"""`python -m services.scheduler` / `aimaas-scheduler`: run a scheduler from AIMAAS_* settings."""

from services.common.grpc_core import prefer_epoll_io


def main() -> None:
    prefer_epoll_io()  # before anything imports grpcio: gRPC core reads it once, at import
    from services.scheduler.app import main as run

    run()


if __name__ == "__main__":
    main()
