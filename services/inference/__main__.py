"""`python -m services.inference` / `aimaas-inference`: run an inference node (see app.main)."""

from services.inference.app import main

if __name__ == "__main__":
    main()
