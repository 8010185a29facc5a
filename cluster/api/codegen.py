"""Generates the Python modules of the gRPC API from proto/ (``python -m epserve.cluster.api.codegen``).

The modules are committed, so that a plain install can import them; a test regenerates them and fails when
the committed ones are stale. protoc names the module ``epserve.v1.inference_pb2`` (after the .proto path);
the modules live in ``epserve.cluster.api``, so the service module's import and the messages' module name
are rewritten to match.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
PROTO = "epserve/v1/inference.proto"
OUT = Path(__file__).resolve().parent
MODULES = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def generate(proto_root: Path = PROTO_ROOT) -> dict[str, str]:
    """{module file name: source} freshly generated from the .proto."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        include = str(Path(protoc.__file__).parent / "_proto")
        rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={tmp}",
                          f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(proto_root / PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto_root / PROTO}")
        out = {}
        for name in MODULES:
            text = (Path(tmp) / "epserve" / "v1" / name).read_text()
            out[name] = (text.replace("from epserve.v1 import inference_pb2", "from . import inference_pb2")
                         # the messages' __module__, so that they pickle (Serve's gRPC proxy, Ray)
                         .replace("'epserve.v1.inference_pb2'", "'epserve.cluster.api.inference_pb2'"))
        return out


def main() -> int:
    for name, text in generate().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
