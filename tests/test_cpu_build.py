"""How the C++ kernels are built and chosen: one build per instruction-set variant, picked from the
CPU's flags at run time (or TURNOUT_ISA), cached by source, variant and torch version."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kernels import cpu

AVX512 = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"})


def test_the_widest_variant_the_cpu_runs_is_chosen_and_a_narrower_one_can_be_forced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cpu.runnable_isas(AVX512) == ["avx512", "avx2", "scalar"]
    assert cpu.runnable_isas(frozenset({"avx2", "fma", "f16c", "avx512f"})) == ["avx2", "scalar"]  # no VNNI
    assert cpu.runnable_isas(frozenset({"sse2"})) == ["scalar"]
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.delenv("TURNOUT_ISA", raising=False)
    assert cpu.selected_isa() == "avx2"
    monkeypatch.setenv("TURNOUT_ISA", "scalar")
    assert cpu.selected_isa() == "scalar"
    monkeypatch.setenv("TURNOUT_ISA", "avx512")  # this CPU cannot run it: refused, never a SIGILL
    with pytest.raises(ValueError, match="runs only avx2, scalar"):
        cpu.selected_isa()
    monkeypatch.setenv("TURNOUT_ISA", "neon")
    with pytest.raises(ValueError, match="expected one of"):
        cpu.selected_isa()


def test_the_build_cache_follows_xdg_and_is_keyed_on_variant_and_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TURNOUT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = Path(cpu.__file__).parent / "a8.cpp"
    avx2 = cpu._build_dir(source, "avx2")
    assert avx2.parent == tmp_path / "turnout" / "extensions" and avx2.name.startswith("a8-avx2-")
    assert cpu._build_dir(source, "scalar") != avx2
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert cpu._build_dir(source, "avx2") != avx2  # another torch: another build


def test_a_kernel_that_fails_to_build_raises_and_serving_falls_back_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(cpu, "_HERE", tmp_path)
    monkeypatch.setattr(cpu, "_LOADED", {})  # this test's builds only
    monkeypatch.setenv("TURNOUT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TURNOUT_ISA", "scalar")
    with pytest.raises(cpu.KernelBuildError, match="could not build the broken CPU kernel for scalar"):
        cpu.build("broken")
    with caplog.at_level(logging.WARNING, logger="kernels.cpu"):
        assert cpu.load("broken") is None
    assert "using the slower torch path" in caplog.text


@pytest.mark.skipif(not cpu.compiler_available(), reason="no C++ compiler here")
def test_every_variant_this_cpu_runs_builds_and_loads_as_its_own_module() -> None:
    for isa in cpu.runnable_isas():
        module = cpu.build("a8", isa)
        assert module.__name__ == f"turnout_a8_{isa}"


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import time

    monkeypatch.setenv("TURNOUT_CACHE", str(tmp_path))
    build_dir = cpu._build_dir(Path(cpu.__file__).parent / "a8.cpp", "scalar")
    lock = build_dir / "lock"
    lock.touch()
    cpu._clear_stale_lock(build_dir)
    assert lock.exists()  # a build may be running right now: left alone
    old = time.time() - cpu.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu._clear_stale_lock(build_dir)
    assert not lock.exists()
