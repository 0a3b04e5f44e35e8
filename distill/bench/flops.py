"""FLOP counts of the benchmark's convention (experiments/bench/README.md), and device peaks.

Convention (matrix multiplications only): a forward pass costs, per token,
  2 × (non-embedding weight matrices + output projection) + 4 × layers × seq_len × d_model
(the last term: attention scores and values against seq_len keys); a training pass counts 3× its
forward pass. Generation counts what runs: the prompt's prefill projects only its last position
onto the vocabulary, and every step attends over the whole KV cache (prompt + new tokens).
"""
from __future__ import annotations

from distill.models import ModelConfig


def weight_matrix_params(cfg: ModelConfig) -> int:
  """Entries of all non-embedding weight matrices (q, k, v, o, gate, up, down of every layer)."""
  D, F = cfg.d_model, cfg.d_ff
  HD, KD = cfg.n_heads * cfg.resolved_head_dim, cfg.n_kv_heads * cfg.resolved_head_dim
  return cfg.n_layers * (D * HD + 2 * D * KD + HD * D + 3 * D * F)


def forward_flops(cfg: ModelConfig, tokens: int, seq_len: int, projected: int | None = None):
  """FLOPs of a forward pass over `tokens` tokens attending to `seq_len` keys each, of which
  `projected` (default: all) are projected onto the vocabulary."""
  projected = tokens if projected is None else projected
  return (2 * weight_matrix_params(cfg) * tokens + 2 * cfg.d_model * cfg.vocab_size * projected
          + 4 * cfg.n_layers * seq_len * cfg.d_model * tokens)


def distill_step_flops(teacher: ModelConfig, student: ModelConfig, batch: int, seq_len: int):
  """Teacher forward + student training pass (3× forward) over batch × seq_len tokens."""
  tokens = batch * seq_len
  return forward_flops(teacher, tokens, seq_len) + 3 * forward_flops(student, tokens, seq_len)


def generate_flops(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int):
  """Prefill of the prompts (last position projected) + one decode step per new token."""
  cache_len = prompt_len + new_tokens
  prefill = forward_flops(cfg, batch * prompt_len, cache_len, projected=batch)
  return prefill + forward_flops(cfg, batch * new_tokens, cache_len)


# Dense peak FLOP/s per device (vendor data sheets, no sparsity), by a substring of
# jax's device_kind; more specific names first. 'float32' is what XLA's default matmul
# precision runs fp32 dots at: TF32 tensor cores on NVIDIA Ampere and later, bf16 MXU passes
# on TPU.
PEAK_FLOPS = (
    ('H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
    ('H100', {'bfloat16': 989e12, 'float32': 494e12}),      # SXM (and NVL is close)
    ('H200', {'bfloat16': 989e12, 'float32': 494e12}),
    ('A100', {'bfloat16': 312e12, 'float32': 156e12}),
    ('TPU v4', {'bfloat16': 275e12, 'float32': 275e12}),
    ('TPU v5 lite', {'bfloat16': 197e12, 'float32': 197e12}),   # v5e
    ('TPU v5', {'bfloat16': 459e12, 'float32': 459e12}),        # v5p
    ('TPU v6 lite', {'bfloat16': 918e12, 'float32': 918e12}),   # v6e (Trillium)
)


def device_peak_flops(device_kind: str, dtype: str) -> float | None:
  """The table's peak for this device and compute dtype, or None when the device is unknown."""
  for name, peaks in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peaks[dtype]
  return None
