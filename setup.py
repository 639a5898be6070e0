"""Build hook: generate the gRPC/protobuf Python stubs from protos/ (never committed).

Stubs land beside the hand-written code in the layout of their proto packages
(`aimaas/registry/v1/registry_pb2.py`, `inference/grpc_predict_v2_pb2.py`), so generated imports
need no rewriting. They are generated before `setup()` so that package discovery sees them in both
regular and editable installs.
"""

from __future__ import annotations

import pathlib

from setuptools import setup

ROOT = pathlib.Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"


def generate_stubs() -> list[pathlib.Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed to generate the gRPC stubs from protos/")
    # The Open Inference Protocol's full names (inference.ModelInferRequest, ...) are also defined by
    # tritonclient and other clients; a private descriptor pool lets both live in one process.
    for module in (ROOT / "inference").glob("*_pb2.py"):
        text = module.read_text()
        module.write_text(
            text.replace("_descriptor_pool.Default().AddSerializedFile(", "_descriptor_pool.DescriptorPool().AddSerializedFile(")
        )
    # Generated folders become regular packages so wheels include them.
    for proto in protos:
        package_dir = ROOT / proto.parent.relative_to(PROTO_ROOT)
        while package_dir != ROOT:
            (package_dir / "__init__.py").touch(exist_ok=True)
            package_dir = package_dir.parent
    return protos


generate_stubs()
setup()
