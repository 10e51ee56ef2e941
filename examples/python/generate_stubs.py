#!/usr/bin/env python3
"""Generates the Python stubs of Tessera's public API from proto/.

    python generate_stubs.py            # into ./stubs (the committed copy)
    python generate_stubs.py --out DIR  # anywhere else (the tests compare the two)

The stubs land as DIR/tessera/v1/tessera_pb2{,_grpc}.py(+ .pyi); put DIR on
sys.path and import `tessera.v1.tessera_pb2`.
"""

import argparse
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PUBLIC_PROTO = "tessera/v1/tessera.proto"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=HERE / "stubs",
        help="folder to write the stubs into [default: %(default)s]",
    )
    args = parser.parse_args()
    try:
        from grpc_tools import protoc
    except ImportError:
        print(
            "grpcio-tools is not installed: pip install -r "
            f"{HERE / 'requirements.txt'}",
            file=sys.stderr,
        )
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    # Relative paths keep the generated files free of this machine's folders.
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={args.out}",
            f"--pyi_out={args.out}",
            f"--grpc_python_out={args.out}",
            str(PROTO_ROOT / PUBLIC_PROTO),
        ]
    )
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
