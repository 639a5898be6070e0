"""The CLI's one read of the process environment.

The snapshot is taken once in the command group and passed down: it decides defaults the user did
not give as options, and it is the base environment of every launched service, so any other
`AIMAAS_*` setting passes through to them unchanged.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from aimaas.cli.ports import DEFAULT_PORTS, SERVICE_NAMES, port_env_var


class InvalidEnvironment(ValueError):
    """A variable of the environment has an unusable value."""


@dataclass(frozen=True)
class CliEnvironment:
    variables: Mapping[str, str]

    @classmethod
    def capture(cls) -> CliEnvironment:
        return cls(MappingProxyType(dict(os.environ)))

    def get(self, name: str) -> str | None:
        value = self.variables.get(name)
        return value if value else None

    def which(self, program: str) -> str | None:
        """Full path of a program on this environment's PATH."""
        return shutil.which(program, path=self.variables.get("PATH", os.defpath))

    # Settings of the launched services that `aimaas up` must know too, so that it probes the
    # ports and endpoints the services really use.

    def etcd_endpoints(self) -> str | None:
        return self.get("AIMAAS_ETCD__ENDPOINTS")

    def s3_endpoint(self) -> str | None:
        if (self.get("AIMAAS_OBJECT_STORE__KIND") or "local").lower() != "s3":
            return None
        return self.get("AIMAAS_OBJECT_STORE__ENDPOINT")

    def s3_bucket(self) -> str | None:
        return self.get("AIMAAS_OBJECT_STORE__BUCKET")

    def port_overrides(self) -> dict[tuple[str, str], int]:
        """Service ports set explicitly via AIMAAS_<SERVICE>__<KIND>_PORT."""
        overrides: dict[tuple[str, str], int] = {}
        for service in SERVICE_NAMES:
            for kind in DEFAULT_PORTS[service]:
                variable = port_env_var(service, kind)
                value = self.get(variable)
                if value is None:
                    continue
                if not value.isdigit() or not 0 < int(value) < 65536:
                    raise InvalidEnvironment(f"{variable}={value!r} is not a port number (1..65535)")
                overrides[(service, kind)] = int(value)
        return overrides

    def child_environment(self, settings: Mapping[str, str]) -> dict[str, str]:
        """Environment of a launched process: ours, with the launcher's settings on top."""
        env = dict(self.variables)
        env.update(settings)
        return env
