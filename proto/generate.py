"""Regenerate (or check) the Python code of Ferry's .proto files.

Layout: every ``.proto`` file lives under ``proto/ferry/`` and is compiled with ``-I proto``,
so its generated modules land beside it and import as ``ferry.v1.client_pb2`` (the package
``ferry`` is the folder ``proto/ferry``). Each ``X.proto`` gives ``X_pb2.py``,
``X_pb2_grpc.py`` and ``X_pb2.pyi``; these generated files are committed.

The generator is pinned (``grpcio-tools==1.81.1``): another version writes different code
(and a different minimum protobuf / grpcio runtime), so this script refuses to run with one.

Usage (from the repository root):

    python proto/generate.py           # rewrite the generated files in place
    python proto/generate.py --check   # exit 1 and list the differences, change nothing

Generated files whose ``.proto`` no longer exists are deleted in place / reported by --check.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = "ferry"
GRPC_TOOLS_VERSION = "1.81.1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[str]:
    """The .proto files to compile, as sorted POSIX paths relative to ``proto_root``."""
    files = sorted(p.relative_to(proto_root).as_posix()
                   for p in (proto_root / PACKAGE_DIR).rglob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root / PACKAGE_DIR}")
    return files


def generated_files(root: Path) -> list[str]:
    """Generated files present under ``root`` (relative POSIX paths, sorted)."""
    return sorted(p.relative_to(root).as_posix() for p in (root / PACKAGE_DIR).rglob("*")
                  if p.is_file() and p.name.endswith(GENERATED_SUFFIXES))


def check_generator_version() -> None:
    try:
        found = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        found = None
    if found != GRPC_TOOLS_VERSION:
        raise RuntimeError(
            f"proto/generate.py needs grpcio-tools=={GRPC_TOOLS_VERSION} (found {found}); "
            f"run: pip install grpcio-tools=={GRPC_TOOLS_VERSION}")


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Compile every .proto under ``proto_root`` into ``out_dir``; return the files written."""
    check_generator_version()
    import grpc_tools  # after the version check, for a clear error when it is missing

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"-I{well_known}",
           f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}",
           *proto_files(proto_root)]
    done = subprocess.run(cmd, check=False, cwd=proto_root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return generated_files(out_dir)


def differences(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Regenerate into a temporary folder and compare with the committed files. Returns one
    line per difference (empty: up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        fresh = set(generate(fresh_root, proto_root))
        committed = set(generated_files(proto_root))
        diffs = [f"missing (run proto/generate.py): {name}" for name in sorted(fresh - committed)]
        diffs += [f"stale (its .proto is gone): {name}" for name in sorted(committed - fresh)]
        diffs += [f"out of date (run proto/generate.py): {name}"
                  for name in sorted(fresh & committed)
                  if not filecmp.cmp(fresh_root / name, proto_root / name, shallow=False)]
    return diffs


def regenerate_in_place(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Rewrite the generated files in ``proto_root``; delete stale ones. Returns the files
    written."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        for name in set(generated_files(proto_root)) - set(fresh):
            (proto_root / name).unlink()
        for name in fresh:
            shutil.copyfile(Path(tmp) / name, proto_root / name)
    return fresh


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with a fresh generation; exit 1 on any difference")
    args = parser.parse_args(argv)
    if args.check:
        diffs = differences()
        for line in diffs:
            print(line)
        return 1 if diffs else 0
    for name in regenerate_in_place():
        print(f"wrote proto/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
