"""Gemma 3 in the engine against transformers' Gemma3ForCausalLM: a tiny random model, and the real 270M."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from engine import zoo
from engine.embedded import EmbeddedConfig, EmbeddedEngine
from engine.loader import load_transformer, read_args
from engine.model.args import GemmaArgs
from engine.model.gemma import GemmaTransformer
from engine.model.kv_cache import AttentionBatch
from engine.model.quantized import Int4Linear, NF4Linear, QuantSpec, TiedQuantizedEmbedding, load_quantized_transformer
from engine.runner import ModelRunner
from engine.speculative.speculator import SpeculativeConfig
from engine.tokenizer import Tokenizer
from tests.conftest import greedy_ids as _generate

VOCAB, WINDOW, SPECIALS = 256, 8, ["<pad>", "<eos>", "<bos>", "<unk>"]
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
SEQ = [2, *torch.randint(4, VOCAB, (21,), generator=torch.Generator().manual_seed(1)).tolist()]  # <bos> + 21


def _tiny_config():  # type: ignore[no-untyped-def]
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # 4 heads x 32 != 64
        query_pre_attn_scalar=24,  # a scale unlike head_dim ** -0.5
        sliding_window=WINDOW,
        layer_types=LAYER_TYPES,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        max_position_embeddings=256,
        initializer_range=0.1,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )


def _save_tokenizer(out: Path) -> None:
    """A word-level tokenizer whose post-processor prepends <bos>, as Gemma's does."""
    words = SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(_tiny_config()).eval()
    with torch.no_grad():  # norms start at zero (a scale of 1): give them values the parity can see
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("tiny-gemma3")
    hf.save_pretrained(out)
    _save_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def hf_model(tiny_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def expected(hf_model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        return hf_model(torch.tensor([SEQ])).logits[0]


def test_config_is_read_as_gemma(tiny_dir: Path) -> None:
    args = read_args(tiny_dir)
    assert isinstance(args, GemmaArgs)
    assert (args.head_dim, args.n_kv_heads, args.sliding_window) == (32, 2, WINDOW)
    assert args.sliding == (True, True, False, True)
    assert (args.rope_theta, args.rope_local_theta, args.query_pre_attn_scalar) == (1e6, 1e4, 24.0)


def test_transformers_4_config_names() -> None:
    cfg = {"model_type": "gemma3_text", "num_hidden_layers": 7, "rope_theta": 5e5, "rope_local_base_freq": 2e4}
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 8.0}
    args = GemmaArgs.from_hf_config(cfg)
    assert args.sliding == (True,) * 5 + (False, True)  # sliding_window_pattern 6
    assert (args.rope_theta, args.rope_factor, args.rope_local_theta) == (5e5, 8.0, 2e4)


def test_the_window_matters(hf_model, expected: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """Guards the parity tests: with a window of 8 the last logits differ from full attention's."""
    hf_model.config.sliding_window = 10_000
    try:
        with torch.inference_mode():
            unwindowed = hf_model(torch.tensor([SEQ])).logits[0]
    finally:
        hf_model.config.sliding_window = WINDOW
    torch.testing.assert_close(unwindowed[:WINDOW], expected[:WINDOW], atol=1e-5, rtol=1e-5)
    assert (unwindowed[-1] - expected[-1]).abs().max() > 1e-2


@torch.inference_mode()
def test_prefill_logits_match_transformers(tiny_dir: Path, expected: torch.Tensor) -> None:
    model = load_transformer(tiny_dir, torch.float32)
    assert isinstance(model, GemmaTransformer)
    model.setup_caches(n_slots=3, max_len=64)
    got = model(torch.tensor([SEQ]), AttentionBatch.build(1, torch.arange(len(SEQ))[None]))[0]
    assert expected.abs().max() > 1.0  # logits of a useful size, not a near-zero random init
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_batched_decode_and_verify_match_transformers(tiny_dir: Path, hf_model, expected: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """Two sequences decode side by side one token at a time, past the window, then verify drafts."""
    other = SEQ[:1] + SEQ[:0:-1]  # <bos> and the rest reversed
    other_expected = hf_model(torch.tensor([other])).logits[0]
    runner = ModelRunner(load_transformer(tiny_dir, torch.float32), n_slots=2, max_len=64)
    starts = [5, 3]
    torch.testing.assert_close(runner.prefill(0, SEQ[:5], 0), expected[4], atol=1e-5, rtol=1e-5)
    runner.prefill(1, other[:3], 0)
    for step in range(14):
        pos = [starts[0] + step, starts[1] + step]
        logits = runner.decode([SEQ[pos[0]], other[pos[1]]], pos)
        torch.testing.assert_close(logits[0], expected[pos[0]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], other_expected[pos[1]], atol=1e-5, rtol=1e-5)
    rows = [SEQ[19:22], other[17:19]]  # a token and its drafts, rows of different widths
    logits = runner.verify(rows, [19, 17])
    torch.testing.assert_close(logits[0], expected[19:22], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, :2], other_expected[17:19], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("speculative", [None, SpeculativeConfig("ngram", num_draft_tokens=3)])
async def test_engine_greedy_equals_transformers_generate(
    tiny_dir: Path,
    hf_model,  # type: ignore[no-untyped-def]
    speculative: SpeculativeConfig | None,
) -> None:
    prompts = [SEQ[:6], SEQ[:3] + SEQ[3:6] * 3, [2, 7, 7, 7]]
    lengths = [26, 20, 14]
    want = []
    for prompt, n in zip(prompts, lengths):
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
        want.append(out[0, len(prompt) :].tolist())
    runner = ModelRunner(load_transformer(tiny_dir, torch.float32), 2, 64)
    config = EmbeddedConfig(2, 64, max_prefill_tokens=4, speculative=speculative)  # 2 slots, chunked prefill
    engine = EmbeddedEngine(runner, Tokenizer(tiny_dir), config, "float32")
    await engine.start()
    try:
        got = await asyncio.gather(
            *[_generate(engine, f"r{i}", p, n) for i, (p, n) in enumerate(zip(prompts, lengths))]
        )
    finally:
        await engine.stop()
    assert list(got) == want


def test_prompts_get_one_bos_and_chat_falls_back_to_a_transcript(tiny_dir: Path) -> None:
    tok = Tokenizer(tiny_dir)
    assert tok.chat_template is None and tok.prompt_prefix == [2]
    assert tok.encode_prompt("w1 w2") == [2, 5, 6]
    assert tok.encode_prompt("<bos> w1") == [2, 5]  # already there: not doubled
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.render_chat(chat) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert 1 in tok.stop_token_ids  # <eos>


@pytest.mark.parametrize(
    ("spec", "atol"),
    [(QuantSpec("nf4", 64, activations="float"), 1e-4), (QuantSpec("int4", 32, activations="float"), 0.1)],
)
@torch.inference_mode()
def test_quantized_gemma_matches_its_reference_dequantization(tiny_dir: Path, spec: QuantSpec, atol: float) -> None:
    """Every linear (and the tied embedding) quantized; logits as the float model with dequantized
    weights gives them (nf4 exactly; int4's packed kernel takes bf16 activations)."""
    from safetensors.torch import load_file

    from engine.model import quantized

    model = load_quantized_transformer(tiny_dir, spec, torch.float32)
    kind = NF4Linear if spec.method == "nf4" else Int4Linear
    assert isinstance(model, GemmaTransformer) and isinstance(model.tok_embeddings, TiedQuantizedEmbedding)
    assert all(isinstance(b.attention.wqkv, kind) and isinstance(b.feed_forward.w2, kind) for b in model.blocks)
    tensors = load_file(str(tiny_dir / "quantized" / f"{spec.tag}.safetensors"))
    reference = load_transformer(tiny_dir, torch.float32)
    for name, module in reference.named_modules():
        if isinstance(module, quantized.Linear):
            q = quantized._from_tensors(name, tensors, spec, module.in_features)
            deq = (quantized.int4 if spec.method == "int4" else quantized.nf4).dequantize(q)
            module.weight = torch.nn.Parameter(deq)
    reference.tok_embeddings.weight = reference.output.weight
    batch = AttentionBatch.build(0, torch.arange(len(SEQ))[None])
    model.setup_caches(1, 64)
    reference.setup_caches(1, 64)
    got, want = model(torch.tensor([SEQ]), batch)[0], reference(torch.tensor([SEQ]), batch)[0]
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.slow
@torch.inference_mode()
def test_real_gemma3_270m_matches_transformers() -> None:
    from transformers import AutoModelForCausalLM

    path = zoo.pull("gemma3-270m")
    tok = Tokenizer(path)
    ids = tok.encode_prompt("The capital of France is Paris. The capital of Germany is")
    assert ids[0] == tok.token_id("<bos>") and ids[1] != ids[0]
    assert {tok.token_id("<eos>"), tok.token_id("<end_of_turn>")} <= tok.stop_token_ids
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = hf(torch.tensor([ids])).logits[0]
    model = load_transformer(path, torch.float32)
    runner = ModelRunner(model, 1, 128)
    got = [runner.prefill(0, ids[:-3], 0)]
    got += [runner.decode([t], [i])[0] for i, t in enumerate(ids[-3:], len(ids) - 3)]
    got_t = torch.stack(got)
    assert torch.equal(got_t.argmax(-1), want[-4:].argmax(-1))
    assert (got_t - want[-4:]).abs().max() < 1e-3
    assert tok.decode([int(got_t[-1].argmax())]).strip() == "Berlin"
