"""Fixtures of the deployment tests: deploy/check.py loaded as a module, overlays rendered once."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_check():
    """deploy/check.py (a script, not a package) as a module; one instance per session."""
    if "aimaas_deploy_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("aimaas_deploy_check", ROOT / "deploy" / "check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["aimaas_deploy_check"]


@pytest.fixture(scope="session")
def check():
    return load_check()


@pytest.fixture(scope="session")
def rendered(check) -> dict[str, list[dict]]:
    """Every overlay rendered by `kubectl kustomize`: overlay name → objects."""
    return {overlay: check.render(check.K8S / "overlays" / overlay) for overlay in check.OVERLAYS}


@pytest.fixture(scope="session")
def compose(check) -> dict:
    return check.load_compose()
