"""Generate (or check) the Python code for the wire contract in ``proto/sealroom/v1``.

``python -m gateway._protogen`` regenerates ``*_pb2.py``, ``*_pb2_grpc.py`` and ``*_pb2.pyi``
next to the ``.proto`` sources; ``--check`` regenerates into a temporary directory and exits
non-zero when the committed output differs (a test runs the check). protoc runs with
``proto/`` as its include root, so the generated modules import each other as
``sealroom.v1.*``: the import package is ``sealroom.v1``, which collides with nothing installed.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent / "proto"
PACKAGE = Path("sealroom/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")


def generate(out: Path) -> list[Path]:
    """Run protoc on every .proto under proto/sealroom/v1, writing into ``out``."""
    sources = sorted((ROOT / PACKAGE).glob("*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files under {ROOT / PACKAGE}")
    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    grpc_include = Path(protoc.__file__).resolve().parent / "_proto"
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins sit beside the interpreter
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{ROOT}",
        f"-I{grpc_include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(s.relative_to(ROOT)) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out / PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def _committed() -> list[Path]:
    return sorted(p for p in (ROOT / PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def check() -> list[str]:
    """Names of generated files that are missing, extra or stale in the committed tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        committed = {p.name: p for p in _committed()}
        problems = [f"missing: {n}" for n in sorted(fresh.keys() - committed.keys())]
        problems += [f"extra: {n}" for n in sorted(committed.keys() - fresh.keys())]
        problems += [
            f"stale: {n}"
            for n in sorted(fresh.keys() & committed.keys())
            if not filecmp.cmp(fresh[n], committed[n], shallow=False)
        ]
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(f"proto: {p} (run `make proto`)", file=sys.stderr)
        return 1 if problems else 0
    for old in _committed():
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for new in generate(Path(tmp)):
            shutil.copy2(new, ROOT / PACKAGE / new.name)
    (ROOT / "sealroom" / "__init__.py").touch()
    (ROOT / PACKAGE / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
