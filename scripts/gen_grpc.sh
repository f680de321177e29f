#!/usr/bin/env bash
# Regenerate the Python modules of the Open Inference Protocol gRPC service from
# src/optiserve/server/grpc/inference.proto: inference_pb2.py (+ .pyi) and inference_pb2_grpc.py.
#
#   scripts/gen_grpc.sh            # uses .venv/bin/python when it exists, else python3
#   PYTHON=/path/to/python scripts/gen_grpc.sh
#
# Needs grpcio-tools (pip install -e '.[dev]'). The generated files are committed, so serving
# never needs it. They check at import that the installed protobuf and grpcio are at least
# the versions this generator was built with; generate with the oldest grpcio-tools the
# project supports if the floor in pyproject.toml must hold.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/src/optiserve/server/grpc"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  python=python3
  [[ -x "$root/.venv/bin/python" ]] && python="$root/.venv/bin/python"
fi

"$python" -m grpc_tools.protoc -I "$out" --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" "$out/inference.proto"

# Two fixes to what protoc writes, done in Python so they work the same on Linux and macOS:
# 1. A private descriptor pool. tritonclient (and KServe's SDK) register the very same
#    'inference.*' message names in protobuf's default pool, and one pool refuses a second
#    definition of a name, so importing both in one process (a test, a gateway) would fail.
#    The wire format does not involve the pool.
# 2. The _grpc module imports its messages package-relative (protoc writes a top-level import).
"$python" - "$out" <<'PY'
import pathlib
import sys

out = pathlib.Path(sys.argv[1])


def patch(name: str, old: str, new: str) -> None:
    path = out / name
    text = path.read_text()
    if old not in text:
        sys.exit(f"gen_grpc.sh: {name} no longer contains {old!r}; update the patch in "
                 "scripts/gen_grpc.sh for this protoc version.")
    path.write_text(text.replace(old, new, 1))


patch("inference_pb2.py", "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(",
      "# optiserve: a private pool, so tritonclient's identical 'inference.*' names can be\n"
      "# imported in the same process (scripts/gen_grpc.sh).\n"
      "_POOL = _descriptor_pool.DescriptorPool()\n"
      "DESCRIPTOR = _POOL.AddSerializedFile(")
patch("inference_pb2_grpc.py", "\nimport inference_pb2 as inference__pb2\n",
      "\nfrom . import inference_pb2 as inference__pb2\n")
PY
echo "regenerated: $(cd "$root" && ls src/optiserve/server/grpc/inference_pb2*)"
