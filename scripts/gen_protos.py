"""Generate the Python code of the wire contract from protos/tessera/v1/*.proto.

The generated *_pb2.py, *_pb2_grpc.py and their .pyi stubs are committed beside
the sources so that the import path is ``tessera.v1``. One script, one pinned
tool set (grpcio-tools 1.80.1, mypy-protobuf 5.1.0, see pyproject.toml), so that
``make check`` can regenerate into a temporary tree and fail on any drift.

Usage:
    python scripts/gen_protos.py            # regenerate in place
    python scripts/gen_protos.py --check    # exit 1 if the committed code drifted
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = PROTO_ROOT / "tessera" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _protoc_include() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def generate(out_root: Path) -> list[Path]:
    """Run protoc with the python, grpc and mypy plugins into ``out_root``.

    Returns:
        The generated files, relative to ``out_root``.
    """
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{_protoc_include()}",
        # The mypy plugins are console scripts beside this interpreter.
        f"--plugin=protoc-gen-mypy={_tool('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_tool('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    # protoc resolves relative proto names against -I; run from the proto root.
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted(
        p.relative_to(out_root)
        for p in (out_root / "tessera" / "v1").iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    """Regenerate, or check for drift with --check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code differs")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "tessera" / "v1").mkdir(parents=True)
        generated = generate(out)
        committed = sorted(
            p.relative_to(PROTO_ROOT)
            for p in PACKAGE_DIR.iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)
        )
        if opts.check:
            drift = [str(p) for p in generated if not (PROTO_ROOT / p).exists()]
            drift += [str(p) for p in committed if p not in generated]
            drift += [
                str(p)
                for p in generated
                if (PROTO_ROOT / p).exists()
                and not filecmp.cmp(out / p, PROTO_ROOT / p, shallow=False)
            ]
            if drift:
                print("generated protobuf code drifted; run `make gen`:", *drift, sep="\n  ")
                return 1
            print(f"protobuf code up to date ({len(generated)} files)")
            return 0
        for stale in committed:
            if stale not in generated:
                (PROTO_ROOT / stale).unlink()
        for rel in generated:
            shutil.copyfile(out / rel, PROTO_ROOT / rel)
        print(f"generated {len(generated)} files in {PACKAGE_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
