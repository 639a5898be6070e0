"""`python -m services.registry` / `aimaas-registry`: run the registry from AIMAAS_* settings."""

from services.registry.app import main

if __name__ == "__main__":
    main()
