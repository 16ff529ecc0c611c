"""Where a forward pass stops being decode-sized: the one place the size thresholds live.

A decode step (a token per sequence, or a token and its drafts) is memory-bound: it takes the
hand-written kernels, which read each weight once for every row. A wider pass (prefill) is
compute-bound: it takes one GEMM on weights dequantized once, and torch's attention.
"""

from __future__ import annotations

# matmul input rows that take the decode kernels (int8 activations, PyTorch's packed int4, the fused
# nf4 look-up); wider inputs dequantize the weight once into a float32 GEMM. benchmarks/quality.py
# raises it to score every position with the decode arithmetic.
DECODE_MAX_ROWS = 32
# matmul input rows that read a float model's 16-bit weight copy (few rows: bound by memory reads)
NARROW_MAX_ROWS = 4
# tokens per sequence in one pass that take the fused decode attention (a token and up to 16 drafts)
DECODE_MAX_TOKENS_PER_ROW = 17


def decode_rows(rows: int) -> bool:
    """Whether a matmul input of ``rows`` rows takes the decode kernels."""
    return 0 < rows <= DECODE_MAX_ROWS


def decode_tokens(tokens_per_row: int) -> bool:
    """Whether a pass of ``tokens_per_row`` tokens per sequence takes the fused decode attention."""
    return tokens_per_row <= DECODE_MAX_TOKENS_PER_ROW


# tokens one native decode step takes (every row of a batch, drafts included); a wider pass runs
# the torch path, whose prefill GEMMs are faster there
NATIVE_MAX_TOKENS = 64


def native_tokens(tokens: int) -> bool:
    """Whether a pass of ``tokens`` tokens in all takes the native decode step."""
    return 0 < tokens <= NATIVE_MAX_TOKENS


# tokens of one prompt piece the native step takes per call where it prefills long prompts (longer
# chunks go in pieces of this): its barriers and norms cost the same per call, so a prompt wants
# few calls. kernels/step.py decides where that is.
NATIVE_MAX_PROMPT_TOKENS = 256
