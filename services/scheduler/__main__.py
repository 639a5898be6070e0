"""`python -m services.scheduler` / `aimaas-scheduler`: run a scheduler from AIMAAS_* settings."""

from services.scheduler.app import main

if __name__ == "__main__":
    main()
