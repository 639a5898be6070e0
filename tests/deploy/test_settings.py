"""Every setting the services read is documented with its default in deploy/README.md, required ones
are set by every manifest, and the guide names only variables that exist."""

from __future__ import annotations

import re

from pydantic import BaseModel, SecretStr

from services.common.settings import CommonSettings


def test_settings_are_derived_from_the_classes(check):
    """Nested blocks become `__`-joined names; required fields and secrets are recognised."""

    class Inner(BaseModel):
        depth: int = 3
        token: SecretStr | None = None

    class Block(BaseModel):
        needed: str
        inner: Inner = Inner()

    class Example(CommonSettings):
        block: Block

    found = {s.env: s for s in check.settings_variables(Example)}
    assert found["AIMAAS_BLOCK__NEEDED"].required
    assert found["AIMAAS_BLOCK__INNER__DEPTH"].default == 3
    assert found["AIMAAS_BLOCK__INNER__TOKEN"].secret
    assert "AIMAAS_ETCD__ENDPOINTS" in found and "AIMAAS_BLOCK__INNER" not in found


def test_every_service_is_discovered(check):
    assert set(check.service_settings()) == {"registry", "scheduler", "inference", "monitor", "gateway"}


def test_readme_documents_every_setting_with_its_default(check):
    text = check.README.read_text()
    assert check.readme_with_table(text) == text, (
        "deploy/README.md's settings table is stale: run .venv/bin/python deploy/check.py --update-readme"
    )
    table = check.settings_table()
    for settings_type in check.service_settings().values():
        for setting in check.settings_variables(settings_type):
            assert f"| `{setting.env}` | {check.format_default(setting)} |" in table


def test_required_settings_are_set_in_every_manifest(check, rendered, compose, tmp_path):
    required = {
        service: {s.env for s in check.settings_variables(cls) if s.required}
        for service, cls in check.service_settings().items()
    }
    seen = set()
    for overlay, objects in rendered.items():
        for workload, container in check.workloads(objects):
            service = check.service_of_command(container.get("command"))
            if service:
                env = check.container_env(objects, workload, container, tmp_path)
                missing = required[service] - set(env)
                assert not missing, f"{overlay} {workload['metadata']['name']} lacks {missing}"
                seen.add((overlay, service))
    for name, service in compose["services"].items():
        which = check.service_of_command(service.get("command"))
        if which:
            assert not required[which] - set(check.compose_env(service)), name
            seen.add(("compose", which))
    assert len(seen) == 3 * len(required)


def test_guide_names_only_real_variables(check, compose):
    """A variable in the guide is a setting, a documented prefix of settings, or a Compose variable."""
    known = {s.env for cls in check.service_settings().values() for s in check.settings_variables(cls)}
    compose_variables = set(re.findall(r"\$\{([A-Z_]+)", check.COMPOSE_FILE.read_text()))
    for name in set(re.findall(r"AIMAAS_[A-Z0-9_]*", check.README.read_text())):
        if name == "AIMAAS_" or name in known or name in compose_variables:
            continue
        assert name.endswith("__") and any(k.startswith(name) for k in known), f"deploy/README.md names unknown {name}"
