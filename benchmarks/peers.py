"""llama.cpp as the speed peer: its Python binding, a Q4_0 model requantized from the shipped Q4_1,
and its own ``llama-server`` (continuous batching), compiled once from the llama.cpp source inside
llama-cpp-python's source distribution and cached.

    .venv/bin/python benchmarks/peers.py   # build llama-server now (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from engine import zoo

LLAMA_CPP_PYTHON = "0.3.36"


def import_llama_cpp() -> Any:
    """``llama_cpp``, installed into this interpreter's environment on first use."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        pass
    print(
        f"llama-cpp-python is not installed: installing it into {sys.prefix}.\n"
        "It compiles llama.cpp from source, which takes about 8 minutes.",
        file=sys.stderr,
        flush=True,
    )
    pip = [sys.executable, "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
    if subprocess.run(pip, check=False).returncode != 0:
        raise RuntimeError("pip install llama-cpp-python failed")
    importlib.invalidate_caches()
    return importlib.import_module("llama_cpp")


def requantized(gguf: Path, kind: str = "Q4_0") -> Path:
    """``gguf`` requantized to ``kind`` with llama.cpp's own ``llama_model_quantize`` (cached beside it).
    Q4_0 takes llama.cpp's repacked x86 path, faster than Q4_1 on most CPUs."""
    out = gguf.with_name(
        gguf.name.replace(".Q4_1.", f".{kind}.") if ".Q4_1." in gguf.name else f"{gguf.stem}.{kind}.gguf"
    )
    if out.exists():
        return out
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    partial = out.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(gguf).encode(), str(partial).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize could not write {kind} from {gguf}")
    partial.rename(out)
    return out


def _cmake() -> str:
    found = shutil.which("cmake")
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "cmake"], check=True)
    return str(Path(sys.executable).with_name("cmake"))


def llama_server() -> Path:
    """The ``llama-server`` binary of llama-cpp-python's bundled llama.cpp, built once (CPU only)."""
    root = zoo.cache_root() / "peers" / f"llama-server-{LLAMA_CPP_PYTHON}"
    binary = root / "llama-server"
    if binary.exists():
        return binary
    print(f"building llama-server {LLAMA_CPP_PYTHON} into {root} (once; about 10 minutes)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(work)]
            + [f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
            check=True,
        )
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = work / "build"
        cmake = _cmake()
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"]
        subprocess.run([cmake, "-S", str(source), "-B", str(build), *flags], check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build), "--target", "llama-server", "-j", jobs], check=True)
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", binary)  # static: nothing else to carry
    return binary


def llama_server_command(binary: Path, gguf: Path, port: int, ctx: int, parallel: int) -> list[str]:
    """``llama-server`` serving ``gguf`` with ``parallel`` slots sharing ``ctx`` tokens (continuous batching)."""
    threads = str(os.cpu_count() or 1)
    return [
        str(binary),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(ctx * parallel),
        "-np",
        str(parallel),
        "-t",
        threads,
        "-tb",
        threads,
        "--cont-batching",
    ]


if __name__ == "__main__":
    print(llama_server())
