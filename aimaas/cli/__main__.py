"""`python -m aimaas.cli` (the same as the `aimaas` console script)."""

from aimaas.cli.main import main

if __name__ == "__main__":
    main()
