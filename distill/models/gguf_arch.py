"""What llama.cpp's architectures read from a GGUF file, for distill's Transformer: which model
options each one computes, its hyper-parameter keys, and its tensors (names, layout, values).

Tensors go through the Hugging Face naming of distill.models.hf and then gguf's own HF -> GGUF
name map, in HF [out, in] layout, as llama.cpp's convert_hf_to_gguf.py writes them:

* llama: the NORM rope rotates adjacent pairs (2i, 2i+1), where HF rotates (i, i + Dh/2), so the
  rows of q_proj and k_proj are permuted within each head (`permute_for_norm_rope`); the dot
  products q.k are unchanged. Llama 3.1/3.2 rope scaling ('llama3') is the F32 tensor
  rope_freqs.weight of per-frequency divisors (`rope_freq_divisors`).
* qwen2 / qwen3 / gemma2 / gemma3 / phi3 use the NEOX rope (HF's rotate_half): q/k as they are.
* gemma2 / gemma3: every RMSNorm weight is stored as 1 + w (llama.cpp multiplies by the stored
  weight; Gemma's norm by 1 + w); llama.cpp scales the embeddings by sqrt(d_model) itself.
  llama.cpp fixes the attention scale from the shapes (1/sqrt(head_dim), or 1/sqrt(d_model /
  n_heads) for the layer counts of the 27B models) instead of reading query_pre_attn_scalar; a
  model whose scalar differs gets the ratio folded into the query (`query_rescale`), into q's
  weight (gemma2) or into q_norm's (gemma3, where the norm follows the projection).
  gemma2 always soft-caps attention scores and logits and reads the output from token_embd.
* phi3: q, k, v fused into attn_qkv and gate, up into ffn_up (gate rows first), as HF's Phi-3
  stores them; rope.dimension_count is the rotated part of each head (partial rotary).
* Sliding windows (gemma2 / gemma3) are written as the window and a per-layer bool array
  attention.sliding_window_pattern, which llama.cpp reads in place of its default period;
  Gemma 3's local layers get rope.freq_base_swa and no scaling, as in HF.
* RoPE scaling 'linear' and 'yarn' are the generic keys rope.scaling.type / factor /
  original_context_length; llama.cpp multiplies cos and sin by rope.scaling.attn_factor times
  YaRN's default 1 + 0.1 ln(factor), so a YaRN attention factor that differs from the default is
  written as their ratio. 'dynamic' is plain RoPE within the original context, the only range
  ModelConfig allows, so nothing is written.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import gguf
import numpy as np

from distill.models import hf, rope
from distill.models.config import ModelConfig

ARCHS = {'llama': gguf.MODEL_ARCH.LLAMA, 'qwen2': gguf.MODEL_ARCH.QWEN2,
         'qwen3': gguf.MODEL_ARCH.QWEN3, 'gemma2': gguf.MODEL_ARCH.GEMMA2,
         'gemma3': gguf.MODEL_ARCH.GEMMA3, 'phi3': gguf.MODEL_ARCH.PHI3}
# ModelConfig fields every architecture's metadata describes, or that do not change what the
# model computes.
_BASE_FIELDS = frozenset({
    'vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'head_dim',
    'max_seq_len', 'rope_theta', 'norm_eps', 'rope_scaling', 'tie_embeddings', 'dtype',
    'param_dtype', 'remat', 'scan_unroll'})
# Per architecture, the further fields its llama.cpp graph reads from the file (any value) ...
_OPTIONS = {
    'llama': ('qkv_bias', 'o_bias'), 'qwen2': ('qkv_bias',), 'qwen3': (),
    'gemma2': ('sliding_window', 'layer_types', 'query_pre_attn_scalar', 'attn_softcap',
               'final_softcap'),
    'gemma3': ('sliding_window', 'layer_types', 'query_pre_attn_scalar', 'final_softcap',
               'rope_local_theta'),
    'phi3': ('partial_rotary_factor', 'sliding_window'),
}
# ... and the values its graph fixes whatever the file says.
_GEMMA = {'norm_plus_one': True, 'post_norms': True, 'embed_scale': True,
          'mlp_activation': 'gelu_tanh'}
_FIXED = {'qwen3': {'qk_norm': True}, 'gemma2': dict(_GEMMA, tie_embeddings=True),
          'gemma3': dict(_GEMMA, qk_norm=True)}
# RoPE scaling types each architecture runs as distill computes them ('dynamic' writes nothing).
_ROPE_TYPES = {'llama': ('llama3', 'linear', 'yarn'), 'qwen2': ('linear', 'yarn'),
               'qwen3': ('linear', 'yarn'), 'gemma2': ('linear', 'yarn'),
               'gemma3': ('linear',), 'phi3': ()}
# Layer counts for which llama.cpp's Gemma scales queries by 1/sqrt(d_model / n_heads) (27B).
_GEMMA_27B_LAYERS = {'gemma2': 46, 'gemma3': 62}
# The YaRN ramp bounds llama.cpp's graphs for these architectures use (they do not read them).
_YARN_BETAS = {'beta_fast': 32, 'beta_slow': 1}


def default_arch(cfg: ModelConfig) -> str:
  if cfg.norm_plus_one:
    return 'gemma3' if cfg.qk_norm else 'gemma2'
  if cfg.partial_rotary_factor != 1.0:
    return 'phi3'
  return 'qwen3' if cfg.qk_norm else 'qwen2' if cfg.qkv_bias and not cfg.o_bias else 'llama'


def rope_type(cfg: ModelConfig) -> str | None:
  return cfg.rope_scaling_dict.get('rope_type') if cfg.rope_scaling else None


def check(cfg: ModelConfig, arch: str):
  """ValueError naming what `arch`'s llama.cpp graph would not compute as the model does."""
  if arch not in ARCHS:
    raise ValueError(f'GGUF architecture must be one of {list(ARCHS)}, got {arch!r}')
  fixed = _FIXED.get(arch, {})
  known = _BASE_FIELDS | set(_OPTIONS[arch]) | set(fixed)
  extra = sorted(f.name for f in dataclasses.fields(cfg)
                 if f.name not in known and getattr(cfg, f.name) != f.default)
  if extra:
    raise ValueError(f'GGUF architecture {arch!r} does not hold {", ".join(extra)} (set on this '
                     'model); llama.cpp would run the model without them')
  wrong = [f'{name}={getattr(cfg, name)!r} (llama.cpp\'s {arch} has {value!r})'
           for name, value in fixed.items() if getattr(cfg, name) != value]
  if wrong:
    raise ValueError(f'GGUF architecture {arch!r} does not match the model: ' + '; '.join(wrong))
  kind = rope_type(cfg)
  if kind not in (None, 'default', 'dynamic') and kind not in _ROPE_TYPES[arch]:
    raise ValueError(f'rope scaling {kind!r} does not export as GGUF architecture {arch!r} '
                     f'(it takes {", ".join(_ROPE_TYPES[arch]) or "none"})')
  if kind == 'yarn':
    _check_yarn(cfg.rope_scaling_dict)
  if arch == 'gemma2' and not (cfg.attn_softcap and cfg.final_softcap):
    raise ValueError("llama.cpp's gemma2 always soft-caps attention scores and logits; this "
                     f'model has attn_softcap={cfg.attn_softcap}, '
                     f'final_softcap={cfg.final_softcap}')
  if arch == 'gemma3' and kind == 'linear' and cfg.any_sliding and \
      not cfg.rope_local_theta:
    raise ValueError("llama.cpp's gemma3 rotates sliding layers without the rope scaling; this "
                     'model scales them too (set rope_local_theta)')


def _check_yarn(scaling: dict):
  for key, value in _YARN_BETAS.items():
    if (scaling.get(key) or value) != value:
      raise ValueError(f'yarn rope scaling with {key}={scaling[key]} does not export: llama.cpp '
                       f'uses {key}={value} for these architectures')
  if not scaling.get('truncate', True):
    raise ValueError('yarn rope scaling with truncate=False does not export: llama.cpp rounds '
                     'the ramp bounds')


def rope_freq_divisors(cfg: ModelConfig) -> np.ndarray | None:
  """llama.cpp's `rope_freqs` tensor (F32 [rotary_dim / 2]) of a model with Llama 3.1's
  rope scaling ('llama3'), else None.

  llama.cpp rotates with frequency base_frequency / rope_freqs[i], base_frequency being plain
  RoPE's theta^(-2i/d); the divisors here make that distill.models.rope's llama3 frequency:
  1 for wavelengths 2 pi / base_frequency below old_len / high_freq_factor, `factor` above
  old_len / low_freq_factor, and in between 1 / ((1 - s) / factor + s) with
  s = (old_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor), the
  blend rope.py applies (s = 1 and s = 0 at the band's two edges, so the cases meet).
  """
  if rope_type(cfg) != 'llama3':
    return None
  s = cfg.rope_scaling_dict
  factor, low, high = s['factor'], s['low_freq_factor'], s['high_freq_factor']
  old_len = s['original_max_position_embeddings']
  dim = cfg.rotary_dim
  wavelen = 2 * np.pi * cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  divisor = np.where(wavelen > old_len / low, float(factor), 1.0)
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  if high != low:
    smooth = (old_len / wavelen - low) / (high - low)
    divisor = np.where(medium, 1 / ((1 - smooth) / factor + smooth), divisor)
  return divisor.astype(np.float32)


def query_rescale(cfg: ModelConfig, arch: str) -> float:
  """Factor on the queries that turns llama.cpp's fixed Gemma attention scale into the model's
  (1 when they agree, as for the released Gemma 2 / 3 sizes); 1 for other architectures."""
  if arch not in _GEMMA_27B_LAYERS:
    return 1.0
  fixed = (cfg.d_model // cfg.n_heads if cfg.n_layers == _GEMMA_27B_LAYERS[arch]
           else cfg.resolved_head_dim)
  return math.sqrt(fixed / (cfg.query_pre_attn_scalar or cfg.resolved_head_dim))


def permute_for_norm_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Rows of a q/k projection (weight [H*Dh, D] or bias [H*Dh]) from HF's rotate_half order
  to llama.cpp's adjacent-pair order, per head."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(params, cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
  """GGUF-named float32 tensors of framework `params` as `arch` reads them (see module doc)."""
  tensors = hf.hf_tensors(params, cfg, qkv_bias=arch == 'qwen2', architecture=(
      'Phi3ForCausalLM' if arch == 'phi3' else 'LlamaForCausalLM'))
  name_map = gguf.get_tensor_name_map(ARCHS[arch], cfg.n_layers)
  out = {}
  divisors = rope_freq_divisors(cfg)
  if divisors is not None:
    out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + '.weight'] = divisors
  rescale = query_rescale(cfg, arch)
  if rescale != 1.0:
    where = ('attn_q_norm (F32)' if cfg.qk_norm else
             'attn_q, whose quantised values are then not those of the unscaled weights')
    warnings.warn(f'query_pre_attn_scalar={cfg.query_pre_attn_scalar} is not the attention '
                  f"scale llama.cpp's {arch} derives from the shapes: the queries are multiplied "
                  f'by {rescale:.6g} in {where} (an equivalent model)')
  for name, value in tensors.items():
    value = value.astype(np.float32)
    if arch == 'llama':
      if '.q_proj.' in name:
        value = permute_for_norm_rope(value, cfg.n_heads)
      elif '.k_proj.' in name:
        value = permute_for_norm_rope(value, cfg.n_kv_heads)
    if cfg.norm_plus_one and name.endswith('norm.weight'):
      value = value + 1
    # Gemma 3's q_norm follows the projection, so the factor goes on the norm there.
    if rescale != 1.0 and name.endswith('.q_norm.weight' if cfg.qk_norm else '.q_proj.weight'):
      value = value * np.float32(rescale)
    out[name_map.get_name(name, try_suffixes=('.weight', '.bias'))] = value
  return out


def add_hparams(writer: gguf.GGUFWriter, cfg: ModelConfig, arch: str):
  """The architecture's hyper-parameter keys ({arch}.*)."""
  Dh = cfg.resolved_head_dim
  writer.add_context_length(cfg.max_seq_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_block_count(cfg.n_layers)
  writer.add_feed_forward_length(cfg.d_ff)
  writer.add_head_count(cfg.n_heads)
  writer.add_head_count_kv(cfg.n_kv_heads)
  writer.add_key_length(Dh)
  writer.add_value_length(Dh)
  writer.add_rope_dimension_count(cfg.rotary_dim)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  _add_rope_scaling(writer, cfg)
  if arch == 'gemma2':
    writer.add_attn_logit_softcapping(cfg.attn_softcap)
  if cfg.final_softcap:
    writer.add_final_logit_softcapping(cfg.final_softcap)
  if arch == 'gemma3':
    writer.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)
  if cfg.sliding_window:
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_sliding_window_pattern(list(cfg.sliding_layers))
  elif arch == 'gemma2':   # gemma2 slides every other layer unless told otherwise
    writer.add_sliding_window_pattern([False] * cfg.n_layers)
  if arch == 'phi3' and cfg.sliding_window:
    warnings.warn(f"llama.cpp's phi3 ignores the sliding window ({cfg.sliding_window}; written "
                  'as its converter does): it attends to all earlier tokens, so it differs from '
                  'the model on sequences longer than the window')


def _add_rope_scaling(writer: gguf.GGUFWriter, cfg: ModelConfig):
  kind, s = rope_type(cfg), cfg.rope_scaling_dict
  if kind == 'linear':
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(s['factor'])
  elif kind == 'yarn':
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(s['factor'])
    writer.add_rope_scaling_orig_ctx_len(s['original_max_position_embeddings'])
    _, attention = rope.inv_freq(cfg)
    default = 1 + 0.1 * math.log(s['factor']) if s['factor'] > 1 else 1.0
    if not math.isclose(attention, default, rel_tol=1e-7):
      writer.add_rope_scaling_attn_factors(attention / default)
