"""`python -m services.gateway` / `aimaas-gateway`: run a gateway from AIMAAS_* settings."""

from services.gateway.app import main

if __name__ == "__main__":
    main()
