"""C++ CPU kernels, compiled on first use with the system compiler and cached on disk.

Each kernel is built once per instruction-set variant, with explicit flags rather than the build
host's ``-march=native``, so a binary never carries instructions its variant does not name:

    avx512  AVX-512 F/BW/VL/DQ + VNNI (and the AVX2/FMA/F16C below)
    avx2    AVX2, FMA, F16C
    scalar  the x86-64 baseline: the portable twins of the SIMD bodies

At run time the widest variant the CPU supports is loaded (``/proc/cpuinfo`` flags);
``TURNOUT_ISA=avx2`` or ``=scalar`` forces a narrower one, so every path can be tested on one
machine. The build cache (``$TURNOUT_CACHE``, else ``$XDG_CACHE_HOME/turnout``, else
``~/.cache/turnout``, under ``extensions/``) is keyed on the sources, the variant and its flags,
and the torch version. Where nothing can be built (no compiler) the caller falls back to torch
with a warning; ``build()`` raises instead, which is what the tests call.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_LOADED: dict[tuple[str, str], ModuleType | None] = {}

# widest first: (variant, compiler flags, /proc/cpuinfo flags the CPU must have)
VARIANTS: tuple[tuple[str, tuple[str, ...], frozenset[str]], ...] = (
    (
        "avx512",
        ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"),
        frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}),
    ),
    ("avx2", ("-mavx2", "-mfma", "-mf16c"), frozenset({"avx2", "fma", "f16c"})),
    ("scalar", (), frozenset()),
)
ISAS = tuple(name for name, _, _ in VARIANTS)
KERNELS = ("a8", "decode", "nf4", "int4", "step")  # every <name>.cpp here


class KernelBuildError(RuntimeError):
    pass


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read). Read once: ``load`` asks
    on every kernel call, and reading /proc/cpuinfo took 0.3 ms (a 10-token prefill spent 40 ms on it)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def runnable_isas(flags: frozenset[str] | None = None) -> list[str]:
    """The variants this CPU can run, widest first (``scalar`` always)."""
    have = cpu_flags() if flags is None else flags
    return [name for name, _, needs in VARIANTS if needs <= have]


def selected_isa() -> str:
    """``$TURNOUT_ISA`` if set (it must name a variant this CPU runs), else the widest it runs."""
    runnable = runnable_isas()
    forced = os.environ.get("TURNOUT_ISA", "").strip().lower()
    if not forced:
        return runnable[0]
    if forced not in ISAS:
        raise ValueError(f"TURNOUT_ISA={forced!r}: expected one of {', '.join(ISAS)}")
    if forced not in runnable:
        raise ValueError(f"TURNOUT_ISA={forced!r}: this CPU runs only {', '.join(runnable)}")
    return forced


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def cache_root() -> Path:
    """The same root as the model zoo's."""
    if env := os.environ.get("TURNOUT_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "turnout"


def _flags(isa: str) -> tuple[str, ...]:
    return next(flags for name, flags, _ in VARIANTS if name == isa)


def _build_dir(source: Path, isa: str) -> Path:
    """One build per content of the source and its headers, variant, flags and torch version."""
    import torch

    h = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        h.update(header.read_bytes())
    h.update(" ".join((isa, *_flags(isa), torch.__version__)).encode())
    path = cache_root() / "extensions" / f"{source.stem}-{isa}-{h.hexdigest()[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _put_ninja_on_path() -> None:
    """The build runs ``ninja``; the pip-installed one lives next to the interpreter, maybe off PATH."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


# a build takes about a minute; a lock file this old was left by a build that was killed, and torch's
# loader would wait on it forever
STALE_LOCK_S = 15 * 60


def _clear_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("removing %s, left %.0f minutes ago by a build that did not finish", lock, age / 60)
        lock.unlink(missing_ok=True)


def build(name: str, isa: str | None = None) -> ModuleType:
    """The compiled ``<name>.cpp`` for ``isa`` (default: the selected one); raises KernelBuildError."""
    isa = isa or selected_isa()
    key = (name, isa)
    if (loaded := _LOADED.get(key)) is not None:
        return loaded
    source = _HERE / f"{name}.cpp"
    build_dir = _build_dir(source, isa)
    _clear_stale_lock(build_dir)
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        log.info("loading the %s CPU kernel for %s (compiled once, ~1 minute, then cached)", name, isa)
        module = cpp_extension.load(
            name=f"turnout_{name}_{isa}",
            sources=[str(source)],
            extra_cflags=["-O3", "-fopenmp", *_flags(isa)],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:
        raise KernelBuildError(f"could not build the {name} CPU kernel for {isa}: {exc}") from exc
    _LOADED[key] = module
    return module


def load(name: str) -> ModuleType | None:
    """The compiled ``<name>.cpp`` for the selected variant, or None (with one warning) where it
    cannot be built: the callers then take the slower torch path."""
    key = (name, selected_isa())
    if key not in _LOADED:
        try:
            build(*key)
        except KernelBuildError as exc:
            log.warning("%s; using the slower torch path", exc)
            _LOADED[key] = None
    return _LOADED[key]
