"""Regenerate the committed gRPC stubs in serve/grpc_gen/ from protos/ (needs grpcio-tools).

    python -m collab_decode.serve.protogen          # rewrite the stubs
    python -m collab_decode.serve.protogen --check  # exit 1 if they differ from the .proto

protoc names modules after the .proto's path (`collab_decode/v1/...`), which would import as our own
top-level package; the stubs are therefore written flat into grpc_gen/ and the one import between
them is made absolute.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
PROTO = "collab_decode/v1/collab_decode.proto"
GEN_DIR = Path(__file__).resolve().parent / "grpc_gen"
STUBS = ("collab_decode_pb2.py", "collab_decode_pb2.pyi", "collab_decode_pb2_grpc.py")
_IMPORT = "from collab_decode.v1 import collab_decode_pb2 as"
_ABSOLUTE_IMPORT = "from collab_decode.serve.grpc_gen import collab_decode_pb2 as"


def generate_stubs() -> dict[str, str]:
    """Run protoc on the .proto; file name -> the text the committed stub should have."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", str(PROTO_ROOT / PROTO)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO}")
        gen = Path(out) / Path(PROTO).parent
        return {name: (gen / name).read_text().replace(_IMPORT, _ABSOLUTE_IMPORT) for name in STUBS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stubs = generate_stubs()
    if args.check:
        stale = [n for n, text in stubs.items() if not (GEN_DIR / n).is_file() or (GEN_DIR / n).read_text() != text]
        print("stale: " + ", ".join(stale) if stale else "stubs match the .proto")
        return 1 if stale else 0
    for name, text in stubs.items():
        (GEN_DIR / name).write_text(text)
    print(f"wrote {', '.join(STUBS)} to {GEN_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
