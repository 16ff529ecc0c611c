"""Distillation mechanics (layer selection, the student, one training step, assembling a zoo model).
Quality claims live in benchmarks, not here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine import zoo
from engine.distill.data import HELD_OUT_TOKENS, pack
from engine.distill.train import _train_step, build_student, kept_layers, trained_weights
from engine.loader import load_transformer


def test_kept_layers_include_both_ends_evenly_spaced() -> None:
    assert kept_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert kept_layers(30, 2) == [0, 29]


def test_pack_cuts_equal_chunks_across_sequences() -> None:
    assert pack([[1, 2, 3], [4, 5], [6, 7, 8]], 3) == [[1, 2, 3], [4, 5, 6]]
    assert HELD_OUT_TOKENS >= 51_200  # the quality benchmark's slice is never trained on


@pytest.fixture(scope="module")
def teacher(model_path: Path):  # type: ignore[no-untyped-def]
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def test_student_copies_the_kept_layers_and_shares_a_frozen_embedding(teacher) -> None:  # type: ignore[no-untyped-def]
    student = build_student(teacher, [0, 29])
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.layers.1.mlp.down_proj.weight"], t["model.layers.29.mlp.down_proj.weight"])
    assert student.model.embed_tokens.weight is student.lm_head.weight  # tied
    assert not student.model.embed_tokens.weight.requires_grad
    assert set(trained_weights(student)) == {k for k in s if k.startswith("model.layers.") or k == "model.norm.weight"}


def test_one_step_moves_the_layers_and_not_the_shared_embedding(teacher) -> None:  # type: ignore[no-untyped-def]
    student = build_student(teacher, [0, 29])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    loss = _train_step(teacher, student, optimizer, torch.randint(0, 49152, (1, 16)), 1e-3)
    after = student.state_dict()
    assert loss > 0 and torch.isfinite(torch.tensor(loss))
    assert not torch.equal(
        after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_a_distilled_entry_assembles_into_a_loadable_model(
    teacher, model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    student = build_student(teacher, [0, 29])
    assets = tmp_path / "assets"
    assets.mkdir()
    save_file(trained_weights(student), str(assets / "model.safetensors"))
    student.config.to_json_file(str(assets / "config.json"))
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "smollm2-135m-instruct").symlink_to(model_path)
    monkeypatch.setenv("TURNOUT_CACHE", str(cache))
    entry = zoo.DistilledEntry("tiny-student", "smollm2-135m-instruct", assets, "test")
    path = zoo.assemble(entry)
    model = load_transformer(path, torch.float32)
    assert model.args.n_layers == 2
    assert torch.equal(model.tok_embeddings.weight, teacher.model.embed_tokens.weight)
