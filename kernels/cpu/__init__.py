"""C++ CPU kernels, compiled on first use with the system compiler and cached on disk."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_LOADED: dict[str, ModuleType | None] = {}


def _build_dir(source: Path) -> Path:
    """One build per content of the source and the shared headers beside it."""
    h = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        h.update(header.read_bytes())
    digest = h.hexdigest()[:12]
    root = Path(os.environ.get("TURNOUT_CACHE", Path.home() / ".cache" / "turnout")).expanduser()
    path = root / "extensions" / f"{source.stem}-{digest}"
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


def load(name: str) -> ModuleType | None:
    """The compiled ``<name>.cpp`` module, or None (with a warning) where it cannot be built."""
    if name not in _LOADED:
        source = _HERE / f"{name}.cpp"
        try:
            from torch.utils import cpp_extension

            _put_ninja_on_path()

            log.info("loading the %s CPU kernel (compiled once, ~1 minute, then cached)", name)
            _LOADED[name] = cpp_extension.load(
                name=f"turnout_{name}",
                sources=[str(source)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(_build_dir(source)),
                verbose=False,
            )
        except Exception as exc:  # no compiler, no headers: fall back to the torch path
            log.warning("could not build the %s CPU kernel (%s); using the slower torch path", name, exc)
            _LOADED[name] = None
    return _LOADED[name]
