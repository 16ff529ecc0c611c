"""Quantized engines on the real model: swapped linears, the on-disk cache, parity and the API."""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.loader import load_transformer
from engine.model import quantized
from engine.model.footprint import weight_bytes
from engine.model.kv_cache import AttentionBatch
from engine.model.linear import Linear
from engine.model.llama import Transformer
from engine.model.quantized import DEFAULT_GROUP_SIZE, Int4Linear, NF4Linear, QuantSpec, load_quantized_transformer
from engine.tokenizer import Tokenizer
from server.config import ExpertConfig, Settings
from tests.conftest import LiveServer


@pytest.fixture(scope="module")
def model_copy(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted model linked into a fresh directory, so its quantized cache starts empty."""
    out = tmp_path_factory.mktemp("model")
    for item in model_path.iterdir():
        if item.is_file():
            (out / item.name).symlink_to(item)
    return out


@pytest.fixture(scope="module")
def text_ids(model_path: Path) -> list[int]:
    return Tokenizer(model_path).encode(pydoc_data.topics.topics["assert"])[:160]


def logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    model.setup_caches(1, 256)
    with torch.inference_mode():
        return model(torch.tensor([ids]), AttentionBatch.build(0, torch.arange(len(ids))[None]))[0]


def fake_quantized(model_path: Path, cache: Path, spec: QuantSpec) -> Transformer:
    """The float model with every weight replaced by the reference dequantization of the cache."""
    tensors = load_file(str(cache))
    model = load_transformer(model_path, torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            q = quantized._from_tensors(name, tensors, spec, module.in_features)
            deq = (quantized.int4 if spec.method == "int4" else quantized.nf4).dequantize(q)
            module.weight = torch.nn.Parameter(deq)
    model.tok_embeddings.weight = model.output.weight  # the engine reads embeddings from the quantized head
    return model


def test_int4_is_quantized_once_then_loaded_from_the_cache(
    model_copy: Path, text_ids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = QuantSpec("int4", 64)
    first = load_quantized_transformer(model_copy, spec, torch.float32)
    cache = model_copy / "quantized" / "int4-g64.safetensors"
    assert cache.exists()
    assert all(isinstance(b.feed_forward.w13, Int4Linear) for b in first.blocks)
    assert isinstance(first.output, Int4Linear)

    def must_not_run(*args: object) -> None:
        raise AssertionError("a cached model was quantized again")

    monkeypatch.setattr(quantized, "quantize_to_cache", must_not_run)
    second = load_quantized_transformer(model_copy, spec, torch.float32)
    torch.testing.assert_close(logits(second, text_ids), logits(first, text_ids))


def test_a_cache_from_another_quantizer_version_is_quantized_again(
    model_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = QuantSpec("int4", 128)
    load_quantized_transformer(model_copy, spec, torch.float32)
    cache = model_copy / "quantized" / f"{spec.tag}.safetensors"
    save_file(load_file(str(cache)), str(cache), metadata={"spec": "{}"})  # as version 1 wrote it
    calls: list[Path] = []
    real = quantized.quantize_to_cache
    monkeypatch.setattr(quantized, "quantize_to_cache", lambda m, s, p: (calls.append(p), real(m, s, p)))
    load_quantized_transformer(model_copy, spec, torch.float32)
    assert calls == [cache]
    load_quantized_transformer(model_copy, spec, torch.float32)  # now current: read, not re-quantized
    assert calls == [cache]


def test_nf4_engine_matches_its_reference_dequantization(model_copy: Path, text_ids: list[int]) -> None:
    spec = QuantSpec("nf4", 64, double_quant=True)
    model = load_quantized_transformer(model_copy, spec, torch.float32)
    assert isinstance(model.layers[0].attention.wqkv, NF4Linear)
    reference = fake_quantized(model_copy, model_copy / "quantized" / f"{spec.tag}.safetensors", spec)
    torch.testing.assert_close(logits(model, text_ids), logits(reference, text_ids), atol=2e-3, rtol=1e-3)


def test_int4_engine_matches_its_reference_dequantization(model_copy: Path, text_ids: list[int]) -> None:
    spec = QuantSpec("int4", 32)
    model = load_quantized_transformer(model_copy, spec, torch.float32)
    reference = fake_quantized(model_copy, model_copy / "quantized" / f"{spec.tag}.safetensors", spec)
    got, want = logits(model, text_ids), logits(reference, text_ids)
    target = torch.tensor(text_ids[1:])
    # the packed kernel takes bf16 activations, so logits drift slightly; the predictions must not
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    nll_got, nll_want = F.cross_entropy(got[:-1], target), F.cross_entropy(want[:-1], target)
    assert abs(nll_got - nll_want) / nll_want < 0.01


@pytest.mark.parametrize("method", ["int4", "nf4"])
def test_decode_with_int8_activations_predicts_like_the_reference(
    method: str, model_copy: Path, text_ids: list[int]
) -> None:
    spec = QuantSpec(method, DEFAULT_GROUP_SIZE[method])  # activations: int8 by default
    model = load_quantized_transformer(model_copy, spec, torch.float32)
    reference = logits(fake_quantized(model_copy, model_copy / "quantized" / f"{spec.tag}.safetensors", spec), text_ids)
    ids = text_ids[:48]
    model.setup_caches(1, 256)
    with torch.inference_mode():  # one token per forward: every linear sees a single row
        got = torch.cat(
            [model(torch.tensor([[t]]), AttentionBatch.build(0, torch.tensor([[i]])))[0] for i, t in enumerate(ids)]
        )
    want, target = reference[: len(ids)], torch.tensor(ids[1:])
    # activation rounding flips some near-tied predictions (nf4: 6 of 48 here) but barely moves the loss
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85
    nll_got, nll_want = F.cross_entropy(got[:-1], target), F.cross_entropy(want[:-1], target)
    assert abs(nll_got - nll_want) / nll_want < 0.02


def test_quantized_weights_take_under_a_third_of_bf16(model_copy: Path, model_path: Path) -> None:
    bf16_bytes = weight_bytes(load_transformer(model_path, torch.float32)) // 2
    for spec in (QuantSpec("int4", 32), QuantSpec("nf4", 64, double_quant=True)):
        assert weight_bytes(load_quantized_transformer(model_copy, spec, torch.float32)) < 0.33 * bf16_bytes
    kept = weight_bytes(
        load_quantized_transformer(model_copy, QuantSpec("int4", 64, quantize_embeddings=False), torch.float32)
    )
    assert kept > 0.33 * bf16_bytes  # a float embedding alone is a fifth of the model


def test_unsupported_group_sizes_are_refused_in_config() -> None:
    with pytest.raises(ValueError, match="group size"):
        ExpertConfig(name="x", quantization="int4", quantization_options={"group_size": 48})
    assert ExpertConfig(name="x", quantization="nf4").quant_spec() == QuantSpec("nf4", 64)
    assert ExpertConfig(name="x", quantization="int4").quant_spec() == QuantSpec("int4", 32)


@pytest.fixture(scope="module")
def int4_server(model_copy: Path):  # type: ignore[no-untyped-def]
    expert = ExpertConfig(
        name="smollm2-int4", model=str(model_copy), quantization="int4", max_model_len=512, max_batch_size=4
    )
    live = LiveServer(Settings(experts=[expert]))
    live.start()
    yield live
    live.stop()


def test_int4_server_answers_and_reports_its_quantization(int4_server: LiveServer) -> None:
    import httpx
    from openai import OpenAI

    client = OpenAI(base_url=f"{int4_server.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2-int4",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 12
    card = client.models.list().data[0].model_dump()
    assert card["turnout"]["quantization"] == "int4-g32"
    assert 0 < card["turnout"]["weight_bytes"] < 100e6
    metrics = httpx.get(f"{int4_server.url}/metrics").text
    labels = 'draft="none",kv_policy="full",model_name="smollm2-int4",quantization="int4-g32"'
    assert f"turnout:engine_config_info{{{labels}}} 1.0" in metrics
    assert 'turnout:engine_weight_bytes{model_name="smollm2-int4"}' in metrics
