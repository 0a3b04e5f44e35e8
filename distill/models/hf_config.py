"""Hugging Face config.json <-> ModelConfig, per architecture (distill.models.hf moves the
weights). Import refuses, naming the field, anything the model cannot compute exactly."""
from __future__ import annotations

from distill.models import config as config_lib
from distill.models.config import ModelConfig

_MODEL_TYPES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
                'gemma2': 'Gemma2ForCausalLM', 'gemma3_text': 'Gemma3ForCausalLM',
                'phi3': 'Phi3ForCausalLM'}
ARCHITECTURES = tuple(_MODEL_TYPES.values())
GEMMA = ('Gemma2ForCausalLM', 'Gemma3ForCausalLM')
LOAD_DTYPES = ('float32', 'bfloat16', 'float16')
_ACTIVATIONS = {'silu': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh'}
# Keys of a rope_scaling dict that carry no scaling (the base and rotary fraction have fields).
_ROPE_NON_SCALING = ('rope_theta', 'type', 'partial_rotary_factor')


def architecture(hf: dict) -> str:
  archs = hf.get('architectures') or [_MODEL_TYPES.get(hf.get('model_type'), hf.get('model_type'))]
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(f'config.json: architectures={archs!r} is not supported; supported dense '
                     f'architectures: {", ".join(ARCHITECTURES)}')
  return archs[0]


def _rope(hf: dict, arch: str) -> tuple[float, dict, float]:
  """(rope_theta, scaling dict, local rope_theta or 0) of the global (and Gemma 3's local)
  layers. transformers 5 nests these under rope_parameters, per layer type for Gemma 3."""
  params = hf.get('rope_parameters') or {}
  local_theta = 0.0
  if 'full_attention' in params:
    local_theta = float((params.get('sliding_attention') or {}).get('rope_theta', 10_000.0))
    params = params['full_attention'] or {}
  elif arch == 'Gemma3ForCausalLM':
    local_theta = float(hf.get('rope_local_base_freq', 10_000.0))
  scaling = dict(hf.get('rope_scaling') or params)
  theta = hf.get('rope_theta', params.get('rope_theta', 10_000.0))
  scaling['rope_type'] = scaling.get('rope_type', scaling.get('type', 'default'))
  if scaling['rope_type'] == 'default':
    return float(theta), {}, local_theta
  scaling = {k: v for k, v in scaling.items() if k not in _ROPE_NON_SCALING}
  if scaling['rope_type'] == 'dynamic':   # HF's original context for dynamic NTK
    scaling['original_max_position_embeddings'] = hf['max_position_embeddings']
  elif scaling['rope_type'] in ('llama3', 'yarn'):
    scaling.setdefault('original_max_position_embeddings',
                       hf.get('original_max_position_embeddings', hf['max_position_embeddings']))
  return float(theta), scaling, local_theta


def _layer_types(hf: dict, arch: str, n_layers: int) -> tuple[int, tuple]:
  """(sliding_window, layer_types) as the architecture's HF model applies them."""
  window = 0 if arch == 'LlamaForCausalLM' else hf.get('sliding_window') or 0
  if arch in ('Qwen2ForCausalLM', 'Qwen3ForCausalLM'):
    window = window if hf.get('use_sliding_window') else 0
  types = hf.get('layer_types')
  if not window:
    types = None if not types or set(types) == {'full_attention'} else types
    return 0, tuple(types or ())
  if types is None and arch in GEMMA:
    period = 2 if arch == 'Gemma2ForCausalLM' else hf.get('sliding_window_pattern', 6)
    types = ['sliding_attention' if (i + 1) % period else 'full_attention'
             for i in range(n_layers)]
  elif types is None and arch in ('Qwen2ForCausalLM', 'Qwen3ForCausalLM'):
    first = hf.get('max_window_layers', n_layers)
    types = ['sliding_attention' if i >= first else 'full_attention' for i in range(n_layers)]
  types = tuple(types or ('sliding_attention',) * n_layers)
  if window >= hf['max_position_embeddings'] or 'sliding_attention' not in types:
    return 0, ()   # a window as long as any sequence changes nothing
  return window, () if set(types) == {'sliding_attention'} else types


def _unsupported(hf: dict, arch: str, scaling: dict) -> list:
  out = []
  rope_type = scaling.get('rope_type', 'default')
  if rope_type not in config_lib.ROPE_TYPES:
    out.append(f'rope_scaling={scaling!r} (rope type {rope_type!r} is not implemented; '
               f'supported rope types: {", ".join(config_lib.ROPE_TYPES)})')
  act = _activation_name(hf, arch)
  if act not in _ACTIVATIONS or (act == 'silu') == (arch in GEMMA):
    out.append(f'hidden_act={act!r} ({arch} is implemented with '
               f'{"gelu_pytorch_tanh" if arch in GEMMA else "silu"} only)')
  if hf.get('mlp_bias'):
    out.append('mlp_bias=True')
  for moe in ('num_experts', 'num_local_experts', 'n_routed_experts'):
    if hf.get(moe):
      out.append(f'{moe}={hf[moe]!r} (mixture of experts)')
  if hf.get('use_bidirectional_attention'):
    out.append('use_bidirectional_attention=True')
  if arch != 'Phi3ForCausalLM' and _partial_rotary(hf) != 1.0:
    out.append(f'partial_rotary_factor={_partial_rotary(hf)!r} (only Phi3ForCausalLM rotates '
               'part of each head)')
  return out


def _activation_name(hf: dict, arch: str) -> str:
  if arch in GEMMA:
    return hf.get('hidden_activation') or hf.get('hidden_act') or 'gelu_pytorch_tanh'
  return hf.get('hidden_act', 'silu')


def _partial_rotary(hf: dict) -> float:
  params = hf.get('rope_parameters') or {}
  return float(hf.get('partial_rotary_factor') or params.get('partial_rotary_factor') or 1.0)


def config_from_hf(hf: dict, dtype: str = 'float32') -> ModelConfig:
  """ModelConfig of a HF config.json dict; ValueError naming any field distill cannot honour."""
  arch = architecture(hf)
  for name in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
               'num_attention_heads', 'max_position_embeddings'):
    if hf.get(name) is None:
      raise ValueError(f'config.json: required field {name!r} is missing')
  theta, scaling, local_theta = _rope(hf, arch)
  unsupported = _unsupported(hf, arch, scaling)
  if unsupported:
    raise ValueError(f'config.json ({arch}): unsupported ' + '; '.join(unsupported))
  if dtype not in LOAD_DTYPES:
    raise ValueError(f'dtype must be one of {LOAD_DTYPES}, got {dtype!r}')
  if dtype not in config_lib.DTYPES:
    raise ValueError(f'dtype={dtype!r} is not supported by ModelConfig (supports '
                     f'{config_lib.DTYPES}); load in bfloat16 instead')
  heads, n_layers = hf['num_attention_heads'], hf['num_hidden_layers']
  window, layer_types = _layer_types(hf, arch, n_layers)
  # attention_bias puts a bias on q, k, v and o alike; Qwen2 always has q/k/v biases only.
  attention_bias = bool(hf.get('attention_bias')) and arch != 'MistralForCausalLM'
  gemma = arch in GEMMA
  return ModelConfig(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=n_layers,
      n_heads=heads, n_kv_heads=hf.get('num_key_value_heads') or heads,
      d_ff=hf['intermediate_size'],
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      max_seq_len=hf['max_position_embeddings'], rope_theta=theta,
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      qk_norm=arch in ('Qwen3ForCausalLM', 'Gemma3ForCausalLM'),
      qkv_bias=arch == 'Qwen2ForCausalLM' or attention_bias, o_bias=attention_bias,
      tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)),
      dtype=dtype, param_dtype=dtype, rope_scaling=scaling,
      partial_rotary_factor=_partial_rotary(hf), rope_local_theta=local_theta,
      sliding_window=window, layer_types=layer_types,
      mlp_activation=_ACTIVATIONS[_activation_name(hf, arch)],
      norm_plus_one=gemma, post_norms=gemma, embed_scale=gemma,
      query_pre_attn_scalar=float(hf.get('query_pre_attn_scalar') or 0) if gemma else 0.0,
      attn_softcap=float(hf.get('attn_logit_softcapping') or 0),
      final_softcap=float(hf.get('final_logit_softcapping') or 0))


# ---- ModelConfig -> config.json ----------------------------------------------------------------

def default_architecture(cfg: ModelConfig) -> str:
  if cfg.norm_plus_one:
    return 'Gemma3ForCausalLM' if cfg.qk_norm else 'Gemma2ForCausalLM'
  if cfg.partial_rotary_factor != 1.0:
    return 'Phi3ForCausalLM'
  if cfg.qk_norm:
    return 'Qwen3ForCausalLM'
  if cfg.qkv_bias and not cfg.o_bias:
    return 'Qwen2ForCausalLM'
  return 'MistralForCausalLM' if cfg.sliding_window and not cfg.layer_types else 'LlamaForCausalLM'


def _mismatch(cfg: ModelConfig, arch: str) -> str | None:
  """Why `arch` cannot express `cfg`, or None."""
  gemma_flags = (cfg.norm_plus_one, cfg.post_norms, cfg.embed_scale,
                 cfg.mlp_activation == 'gelu_tanh')
  if arch in GEMMA and not all(gemma_flags) or arch not in GEMMA and (
      any(gemma_flags) or cfg.query_pre_attn_scalar or cfg.attn_softcap or cfg.final_softcap):
    return ('Gemma architectures are exactly the models with (1 + w) norms, post-norms, a '
            'scaled embedding and GeGLU')
  if cfg.qk_norm and cfg.qkv_bias:
    return 'a model with both qk_norm and qkv_bias has no Hugging Face architecture'
  if cfg.qk_norm != (arch in ('Qwen3ForCausalLM', 'Gemma3ForCausalLM')):
    return (f'qk_norm={cfg.qk_norm} (q/k norm models are Qwen3ForCausalLM or Gemma3ForCausalLM, '
            'and only they)')
  if cfg.qkv_bias and not cfg.o_bias and arch != 'Qwen2ForCausalLM':
    return 'it cannot hold q/k/v biases without an o_proj bias; use Qwen2ForCausalLM'
  if cfg.o_bias and (not cfg.qkv_bias or arch in ('Qwen2ForCausalLM', 'MistralForCausalLM',
                                                  'Phi3ForCausalLM')):
    return 'o_proj biases need q/k/v biases too (attention_bias) and a Llama/Qwen3/Gemma model'
  if cfg.partial_rotary_factor != 1.0 and arch != 'Phi3ForCausalLM':
    return 'partial rotary embeddings need Phi3ForCausalLM'
  if cfg.rope_local_theta and arch != 'Gemma3ForCausalLM':
    return 'a local RoPE base needs Gemma3ForCausalLM'
  if arch == 'Phi3ForCausalLM' and cfg.rope_scaling:
    return 'Phi3ForCausalLM takes no rope_scaling of the implemented types'
  if cfg.sliding_window:
    if arch == 'LlamaForCausalLM':
      return 'LlamaForCausalLM has no sliding-window attention'
    if cfg.layer_types and arch in ('MistralForCausalLM', 'Phi3ForCausalLM'):
      return f'{arch} slides in every layer or none'
  return None


def hf_config(cfg: ModelConfig, arch: str, special_ids: dict | None = None) -> dict:
  """config.json for `cfg` as `arch` (special_ids: bos/eos/pad_token_id)."""
  if arch not in ARCHITECTURES:
    raise ValueError(f'architecture={arch!r} is not one of {ARCHITECTURES}')
  why = _mismatch(cfg, arch)
  if why:
    raise ValueError(f'architecture={arch!r} does not match the model: {why}')
  model_type = {v: k for k, v in _MODEL_TYPES.items()}[arch]
  out = dict(
      architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.resolved_head_dim, max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
      rope_scaling=cfg.rope_scaling_dict or None,
      tie_word_embeddings=cfg.tie_embeddings, torch_dtype=cfg.param_dtype, use_cache=True,
      attention_dropout=0.0, **(special_ids or {}))
  out['hidden_activation' if arch in GEMMA else 'hidden_act'] = (
      'gelu_pytorch_tanh' if arch in GEMMA else 'silu')
  window = cfg.sliding_window or None
  if model_type in ('llama', 'qwen3', 'gemma2', 'gemma3_text'):
    out.update(attention_bias=cfg.o_bias, mlp_bias=False)
  if model_type != 'llama':
    out['sliding_window'] = window
  if model_type in ('qwen2', 'qwen3'):
    out.update(use_sliding_window=bool(window), max_window_layers=cfg.n_layers)
  if cfg.layer_types or (window and model_type not in ('mistral', 'phi3')):
    out['layer_types'] = list(cfg.layer_types or ('sliding_attention',) * cfg.n_layers)
  elif arch in GEMMA:   # without a window, Gemma's default pattern must not slide
    out['layer_types'] = ['full_attention'] * cfg.n_layers
  if arch in GEMMA:
    scalar = cfg.query_pre_attn_scalar or cfg.resolved_head_dim
    out.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
               attn_logit_softcapping=cfg.attn_softcap or None,
               final_logit_softcapping=cfg.final_softcap or None)
  if arch == 'Gemma3ForCausalLM':
    out['rope_local_base_freq'] = cfg.rope_local_theta or cfg.rope_theta
  if arch == 'Phi3ForCausalLM':
    out['partial_rotary_factor'] = cfg.partial_rotary_factor
  return out

