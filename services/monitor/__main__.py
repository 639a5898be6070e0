"""`python -m services.monitor` / `aimaas-monitor`: run a monitor from AIMAAS_* settings."""

from services.monitor.app import main

if __name__ == "__main__":
    main()
