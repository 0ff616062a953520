"""Build a CUDA source file into a shared library with ``nvcc`` on first use, cached, loaded with ctypes.

Why not ``torch.utils.cpp_extension``: its extensions include PyTorch's C++ headers (a build of about a
minute) and bind to one PyTorch build's ABI. The kernels built here take raw device pointers and a
CUDA stream handle, so a plain ``extern "C"`` library serves every PyTorch version, builds in seconds,
and is called through ctypes (launches from ctypes are captured into CUDA graphs like any other on the
capturing stream).

The cache is ``$MAMBAVLM_CACHE/cuda`` (default ``~/.cache/mambavlm/cuda``), one file per (source, defines,
target, nvcc version); a build is written under a temporary name and renamed into place, so concurrent
processes and killed builds never leave a partial library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["CudaBuildError", "build_library", "cache_dir", "find_nvcc"]


class CudaBuildError(RuntimeError):
    """nvcc is missing, or it failed (the message carries its output)."""


def cache_dir() -> Path:
    """Where built libraries are kept: ``$MAMBAVLM_CACHE/cuda``, else ``~/.cache/mambavlm/cuda``."""
    root = os.environ.get("MAMBAVLM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "mambavlm") / "cuda"


@functools.cache
def find_nvcc() -> str | None:
    """The nvcc to build with: ``$CUDA_HOME/bin/nvcc``, else the one on PATH; None if neither exists."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@functools.cache
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout


def build_library(source: Path, defines: dict[str, str | int], arch: str) -> ctypes.CDLL:
    """Compile ``source`` with ``-D`` ``defines`` for ``arch`` (e.g. ``"90"``: ``compute_90`` / ``sm_90``) into
    a cached shared library and load it. Raises CudaBuildError without nvcc or when it fails."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaBuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH) to build " + source.name)
    flags = [f"-D{k}={v}" for k, v in sorted(defines.items())]
    flags += ["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "--shared", "-Xcompiler", "-fPIC"]
    key = hashlib.sha256(source.read_bytes() + "\0".join(flags).encode() + _nvcc_version(nvcc).encode()).hexdigest()
    target = cache_dir() / f"{source.stem}-{key[:24]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            done = subprocess.run([nvcc, *flags, "-o", str(built), str(source)], capture_output=True, text=True)
            if done.returncode != 0:
                raise CudaBuildError(f"nvcc failed to build {source.name} ({' '.join(flags)}):\n{done.stderr.strip()}")
            os.replace(built, target)
    return ctypes.CDLL(str(target))
