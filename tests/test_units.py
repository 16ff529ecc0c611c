"""Small pieces: detokenization, stop strings, sampling filters, config loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.base import SamplingParams
from engine.sampler import filter_logits, make_generator, sample
from engine.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from server.config import load_settings


def test_incremental_detokenizer_handles_multibyte_characters(model_path: Path) -> None:
    tok = Tokenizer(model_path)
    text = "Héllo wörld — 😀 ok, 日本語 text"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_token_bytes_round_trip(model_path: Path) -> None:
    tok = Tokenizer(model_path)
    text = "naïve café 😀"
    assert b"".join(tok.token_bytes(i) for i in tok.encode(text)) == text.encode()


def test_chat_template_and_stop_tokens(model_path: Path) -> None:
    tok = Tokenizer(model_path)
    rendered = tok.render_chat([{"role": "user", "content": "hi"}])
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in rendered
    assert tok.encode("<|im_end|>")[0] in tok.stop_token_ids


def test_stop_matcher_finds_earliest_stop_touching_new_text() -> None:
    m = StopStringMatcher(("END", "\n\n"))
    assert m.holdback == 2
    assert m.find("abc EN", 5) is None
    assert m.find("abc END more", 5) == 4  # began in old text, completed by new text
    assert m.find("x\n\ny END", 2) == 1


def test_top_k_and_top_p_filters() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept_k = filter_logits(logits, SamplingParams(max_tokens=1, top_k=2)).isfinite()
    assert kept_k.tolist() == [True, True, False, False]
    kept_p = filter_logits(logits, SamplingParams(max_tokens=1, top_p=0.7)).isfinite()
    assert kept_p.tolist() == [True, True, False, False]  # 0.5 < 0.7, 0.8 crosses it: keep both
    kept_p = filter_logits(logits, SamplingParams(max_tokens=1, top_p=0.5)).isfinite()
    assert kept_p.tolist() == [True, False, False, False]


def test_seeded_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(4000, 1)
    params = [SamplingParams(max_tokens=1)] * 4000
    gens = [make_generator(i) for i in range(4000)]
    counts = torch.bincount(torch.tensor(sample(logits, params, gens)), minlength=3).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)
    again = sample(logits[:50], params[:50], [make_generator(i) for i in range(50)])
    assert again == sample(logits[:50], params[:50], [make_generator(i) for i in range(50)])


def test_sampling_params_validation() -> None:
    for bad in ({"max_tokens": 0}, {"max_tokens": 1, "temperature": -1}, {"max_tokens": 1, "top_p": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_settings_default_yaml_env_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = load_settings()
    assert [e.name for e in default.experts] == ["smollm2-135m"]
    assert default.router.coe is not None and default.router.coe.fallback is None
    assert default.server.port == 8000
    cfg = tmp_path / "turnout.yaml"
    cfg.write_text("server: {port: 9000}\nexperts:\n  - {name: a, model: smollm2-135m-instruct, max_batch_size: 4}\n")
    assert load_settings(cfg).experts[0].max_batch_size == 4
    monkeypatch.setenv("TURNOUT__SERVER__PORT", "9100")
    assert load_settings(cfg).server.port == 9100  # environment beats the file
    assert load_settings(cfg, {"port": 9200, "max_batch_size": 2}).server.port == 9200  # flags beat both
    assert load_settings(cfg, {"max_batch_size": 2}).experts[0].max_batch_size == 2
    cfg.write_text("experts:\n  - {name: a, quantization: int8}\n")
    with pytest.raises(ValueError):
        load_settings(cfg)


def test_narrow_weight_copy_serves_only_small_batches() -> None:
    from engine.model.linear import Linear, add_narrow_copies

    torch.manual_seed(0)
    layer = Linear(64, 32, bias=False)
    wide = torch.randn(8, 64)
    exact = layer(wide)
    added = add_narrow_copies(layer, torch.bfloat16, max_rows=4)
    assert added == 64 * 32 * 2
    assert torch.equal(layer(wide), exact)  # 8 rows > 4: the float32 weight
    narrow = layer(wide[:2])
    assert narrow.dtype == torch.float32
    assert not torch.equal(narrow, exact[:2])  # the bf16 copy really was used ...
    torch.testing.assert_close(narrow, exact[:2], atol=0.1, rtol=0.02)  # ... and agrees to bf16 precision


def test_the_example_config_is_valid_and_matches_the_defaults() -> None:
    example = Path(__file__).resolve().parent.parent / "turnout.example.yaml"
    settings = load_settings(example)
    assert settings.experts[0].quant_spec() is None and settings.experts[0].speculative is None
    assert settings.model_dump() == load_settings(None).model_dump()


def test_a_vanishing_temperature_samples_greedily_instead_of_dividing_by_it() -> None:
    """temperature 1e-300 would overflow the logits to inf (NaN probabilities): it is greedy."""
    from engine.base import SamplingParams
    from engine.sampler import make_generator, sample_row

    logits = torch.randn(1000)
    for temperature in (1e-300, 5e-324, 1e-6):
        params = SamplingParams(max_tokens=1, temperature=temperature)
        assert params.greedy and sample_row(logits, params, make_generator(0)) == int(logits.argmax())
    assert not SamplingParams(max_tokens=1, temperature=1e-4).greedy


def test_a_vanishing_top_p_keeps_the_most_likely_token() -> None:
    from engine.base import SamplingParams
    from engine.sampler import make_generator, sample_row

    logits = torch.randn(1000)
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=5e-324)
    assert sample_row(logits, params, make_generator(0)) == int(logits.argmax())
