"""Hugging Face checkpoints in and out: Llama / Mistral / Qwen2 / Qwen3 (dense), without torch.

The weight mapping is data (`WEIGHT_TABLE`), read in both directions. HF's nn.Linear stores
[out, in] and the framework [in, out] with heads flattened in HF order, so every mapping is the
identity or a transpose, and per-layer tensors stack along the framework's leading layer axis.

Loading places each tensor straight into its sharding: `jax.make_array_from_callback` asks for
the slice each device holds, and the callback reads just that slice from the (memory-mapped)
safetensors file, so the full model never sits on one device or in host memory at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from distill.models import config as config_lib
from distill.models import sharded
from distill.models.config import ModelConfig
from distill.parallel import mesh as mesh_lib

ARCHITECTURES = ('LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM')
_MODEL_TYPES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
LOAD_DTYPES = ('float32', 'bfloat16', 'float16')
SINGLE_FILE, INDEX_FILE = 'model.safetensors', 'model.safetensors.index.json'
_FLOAT_STORAGE = ('F32', 'BF16', 'F16', 'F64')
# Buffers some exporters wrote next to the weights; they carry nothing the model needs.
_IGNORED = re.compile(r'.*\.rotary_emb\.inv_freq$')


@dataclasses.dataclass(frozen=True)
class WeightRule:
  """One HF tensor family <-> one framework parameter.

  hf: tensor name, with '{layer}' for per-layer tensors (stacked on the framework's axis 0).
  path: the parameter's path in the model state.
  transpose: HF Linear [out, in] vs framework [in, out].
  when: the ModelConfig bool the tensor exists under ('not x' negates); None = always.
  """
  hf: str
  path: tuple[str, ...]
  transpose: bool = False
  when: str | None = None

  @property
  def per_layer(self) -> bool:
    return '{layer}' in self.hf

  def applies(self, cfg: ModelConfig) -> bool:
    if self.when is None:
      return True
    negate, flag = self.when.startswith('not '), self.when.removeprefix('not ')
    return bool(getattr(cfg, flag)) != negate


_ATTN, _MLP = 'model.layers.{layer}.self_attn.', 'model.layers.{layer}.mlp.'
WEIGHT_TABLE = (
    WeightRule('model.embed_tokens.weight', ('embed',)),
    WeightRule('model.norm.weight', ('final_norm',)),
    WeightRule('lm_head.weight', ('unembed',), transpose=True, when='not tie_embeddings'),
    WeightRule('model.layers.{layer}.input_layernorm.weight', ('layers', 'attn_norm')),
    WeightRule(_ATTN + 'q_proj.weight', ('layers', 'wq'), transpose=True),
    WeightRule(_ATTN + 'k_proj.weight', ('layers', 'wk'), transpose=True),
    WeightRule(_ATTN + 'v_proj.weight', ('layers', 'wv'), transpose=True),
    WeightRule(_ATTN + 'o_proj.weight', ('layers', 'wo'), transpose=True),
    WeightRule(_ATTN + 'q_proj.bias', ('layers', 'bq'), when='qkv_bias'),
    WeightRule(_ATTN + 'k_proj.bias', ('layers', 'bk'), when='qkv_bias'),
    WeightRule(_ATTN + 'v_proj.bias', ('layers', 'bv'), when='qkv_bias'),
    WeightRule(_ATTN + 'q_norm.weight', ('layers', 'q_norm'), when='qk_norm'),
    WeightRule(_ATTN + 'k_norm.weight', ('layers', 'k_norm'), when='qk_norm'),
    WeightRule('model.layers.{layer}.post_attention_layernorm.weight', ('layers', 'mlp_norm')),
    WeightRule(_MLP + 'gate_proj.weight', ('layers', 'w_gate'), transpose=True),
    WeightRule(_MLP + 'up_proj.weight', ('layers', 'w_up'), transpose=True),
    WeightRule(_MLP + 'down_proj.weight', ('layers', 'w_down'), transpose=True),
)
_RULE_BY_PATH = {rule.path: rule for rule in WEIGHT_TABLE}


# ---- config.json <-> ModelConfig ---------------------------------------------------------------

def _architecture(hf: dict) -> str:
  archs = hf.get('architectures') or [_MODEL_TYPES.get(hf.get('model_type'), hf.get('model_type'))]
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(f'config.json: architectures={archs!r} is not supported; supported dense '
                     f'architectures: {", ".join(ARCHITECTURES)}')
  return archs[0]


def _rope(hf: dict) -> tuple[float, dict]:
  """(rope_theta, scaling dict); transformers 5 nests both under rope_parameters."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or params
  theta = hf.get('rope_theta', params.get('rope_theta', 10_000.0))
  return float(theta), scaling


def config_from_hf(hf: dict, dtype: str = 'float32') -> ModelConfig:
  """ModelConfig of a HF config.json dict; ValueError naming any field distill cannot honour."""
  arch = _architecture(hf)
  for name in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
               'num_attention_heads', 'max_position_embeddings'):
    if hf.get(name) is None:
      raise ValueError(f'config.json: required field {name!r} is missing')
  theta, scaling = _rope(hf)
  unsupported = []
  rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
  if rope_type != 'default':
    unsupported.append(f'rope_scaling={scaling!r} (rope type {rope_type!r} is not implemented; '
                       'only plain RoPE is)')
  if hf.get('hidden_act', hf.get('hidden_activation', 'silu')) != 'silu':
    unsupported.append(f'hidden_act={hf.get("hidden_act")!r} (only silu / SwiGLU)')
  if hf.get('mlp_bias'):
    unsupported.append('mlp_bias=True')
  if hf.get('partial_rotary_factor', 1.0) != 1.0:
    unsupported.append(f'partial_rotary_factor={hf["partial_rotary_factor"]!r}')
  for moe in ('num_experts', 'num_local_experts', 'n_routed_experts'):
    if hf.get(moe):
      unsupported.append(f'{moe}={hf[moe]!r} (mixture of experts)')
  window = hf.get('sliding_window')
  if arch == 'MistralForCausalLM' and window is not None and window < hf['max_position_embeddings']:
    unsupported.append(f'sliding_window={window!r} (< max_position_embeddings='
                       f'{hf["max_position_embeddings"]}; the model has no sliding-window attention)')
  if hf.get('use_sliding_window'):
    unsupported.append('use_sliding_window=True (the model has no sliding-window attention)')
  layer_types = set(hf.get('layer_types') or ['full_attention'])
  if layer_types != {'full_attention'}:
    unsupported.append(f'layer_types={sorted(layer_types)!r} (only full_attention)')
  if arch in ('LlamaForCausalLM', 'Qwen3ForCausalLM') and hf.get('attention_bias'):
    unsupported.append('attention_bias=True (the model has no o_proj bias)')
  if unsupported:
    raise ValueError(f'config.json ({arch}): unsupported ' + '; '.join(unsupported))
  if dtype not in LOAD_DTYPES:
    raise ValueError(f'dtype must be one of {LOAD_DTYPES}, got {dtype!r}')
  if dtype not in config_lib.DTYPES:
    raise ValueError(f'dtype={dtype!r} is not supported by ModelConfig (supports '
                     f'{config_lib.DTYPES}); load in bfloat16 instead')
  heads = hf['num_attention_heads']
  return ModelConfig(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=hf['num_hidden_layers'],
      n_heads=heads, n_kv_heads=hf.get('num_key_value_heads') or heads, d_ff=hf['intermediate_size'],
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      max_seq_len=hf['max_position_embeddings'], rope_theta=theta,
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), qk_norm=arch == 'Qwen3ForCausalLM',
      qkv_bias=arch == 'Qwen2ForCausalLM', tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      dtype=dtype, param_dtype=dtype)


def default_architecture(cfg: ModelConfig) -> str:
  return ('Qwen3ForCausalLM' if cfg.qk_norm else
          'Qwen2ForCausalLM' if cfg.qkv_bias else 'LlamaForCausalLM')


def _check_architecture(cfg: ModelConfig, arch: str):
  if arch not in ARCHITECTURES:
    raise ValueError(f'architecture={arch!r} is not one of {ARCHITECTURES}')
  if cfg.qk_norm and cfg.qkv_bias:
    raise ValueError('a model with both qk_norm and qkv_bias has no Hugging Face architecture')
  if cfg.qk_norm != (arch == 'Qwen3ForCausalLM'):
    raise ValueError(f'architecture={arch!r} does not match the model: qk_norm={cfg.qk_norm} '
                     '(q/k norm models are Qwen3ForCausalLM, and only they)')
  if cfg.qkv_bias and arch != 'Qwen2ForCausalLM':
    raise ValueError(f'architecture={arch!r} cannot hold q/k/v biases; use Qwen2ForCausalLM')


def hf_config(cfg: ModelConfig, architecture: str, special_ids: dict | None = None) -> dict:
  """config.json for `cfg` as `architecture` (special_ids: bos/eos/pad_token_id)."""
  _check_architecture(cfg, architecture)
  model_type = {v: k for k, v in _MODEL_TYPES.items()}[architecture]
  out = dict(
      architectures=[architecture], model_type=model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.resolved_head_dim, hidden_act='silu', max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=None,
      tie_word_embeddings=cfg.tie_embeddings, torch_dtype=cfg.param_dtype, use_cache=True,
      attention_dropout=0.0, **(special_ids or {}))
  if model_type in ('llama', 'qwen3'):
    out.update(attention_bias=False, mlp_bias=False)
  if model_type in ('mistral', 'qwen2', 'qwen3'):
    out['sliding_window'] = None
  if model_type in ('qwen2', 'qwen3'):
    out.update(use_sliding_window=False, max_window_layers=cfg.n_layers)
  return out


# ---- tensor names and shapes -------------------------------------------------------------------

def _param_shape(cfg: ModelConfig, path: tuple[str, ...]) -> tuple[int, ...]:
  V, D, F = cfg.vocab_size, cfg.d_model, cfg.d_ff
  HD, KD, Dh = cfg.n_heads * cfg.resolved_head_dim, cfg.n_kv_heads * cfg.resolved_head_dim, \
      cfg.resolved_head_dim
  per_layer = dict(attn_norm=(D,), mlp_norm=(D,), wq=(D, HD), wk=(D, KD), wv=(D, KD), wo=(HD, D),
                   bq=(HD,), bk=(KD,), bv=(KD,), q_norm=(Dh,), k_norm=(Dh,), w_gate=(D, F),
                   w_up=(D, F), w_down=(F, D))
  if path[0] == 'layers':
    return per_layer[path[1]]
  return {'embed': (V, D), 'final_norm': (D,), 'unembed': (D, V)}[path[0]]


def expected_tensors(cfg: ModelConfig, rules=WEIGHT_TABLE) -> dict[str, tuple]:
  """HF name -> (rule, layer or None, HF shape) of every tensor a checkpoint of `cfg` holds."""
  out = {}
  for rule in rules:
    if not rule.applies(cfg):
      continue
    shape = _param_shape(cfg, rule.path)
    shape = shape[::-1] if rule.transpose else shape
    for layer in (range(cfg.n_layers) if rule.per_layer else [None]):
      out[rule.hf.format(layer=layer)] = (rule, layer, shape)
  return out


# ---- reading checkpoints -----------------------------------------------------------------------

def read_config(folder: str) -> dict:
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{folder!r} is not a Hugging Face model folder: no config.json')
  with open(path) as f:
    return json.load(f)


def _weight_files(folder: str) -> dict[str, str]:
  """tensor name -> file path, from the shard index or the single model.safetensors."""
  index = os.path.join(folder, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index!r} has no "weight_map" object')
    files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
    for path in sorted(set(files.values())):
      if not os.path.isfile(path):
        raise FileNotFoundError(f'{INDEX_FILE} in {folder!r} names {os.path.basename(path)!r}, '
                                'which does not exist')
    return files
  single = os.path.join(folder, SINGLE_FILE)
  if not os.path.isfile(single):
    raise FileNotFoundError(f'no weights in {folder!r}: expected {SINGLE_FILE} or {INDEX_FILE}')
  with _open(single) as f:
    return {name: single for name in f.keys()}


def _open(path: str):
  try:
    return safe_open(path, framework='numpy')
  except (SafetensorError, OSError) as e:
    raise ValueError(f'corrupt or truncated safetensors file {path!r}: {e}') from None


def _check_tensors(expected: dict, handles: dict, files: dict, cfg: ModelConfig):
  names = {n for n in files if not _IGNORED.match(n)}
  if cfg.tie_embeddings:
    names.discard('lm_head.weight')   # some exporters write the tied copy too
  missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
  if missing or extra:
    raise ValueError('checkpoint tensors do not match config.json: ' + '; '.join(
        f'{what} {len(lst)}: {", ".join(lst[:8])}{" ..." if len(lst) > 8 else ""}'
        for what, lst in (('missing', missing), ('unexpected', extra)) if lst))
  for name, (_, _, shape) in expected.items():
    tensor = handles[files[name]].get_slice(name)
    got = tuple(tensor.get_shape())
    if got != shape:
      raise ValueError(f'tensor {name!r} in {files[name]!r}: expected shape {list(shape)}, '
                       f'got {list(got)}')
    if tensor.get_dtype() not in _FLOAT_STORAGE:
      raise ValueError(f'tensor {name!r} in {files[name]!r} is stored as {tensor.get_dtype()}; '
                       f'only unquantised {"/".join(_FLOAT_STORAGE)} checkpoints load')


def _slices(index, shape):
  return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _reader(rule: WeightRule, shape, handles, files, np_dtype):
  """Callback for make_array_from_callback: the framework-layout block at `index`."""
  def block(name, index):
    if rule.transpose:   # framework [i0:i1, j0:j1] is HF [j0:j1, i0:i1] transposed
      return handles[files[name]].get_slice(name)[index[::-1]].T
    return handles[files[name]].get_slice(name)[index]

  def read(index):
    index = _slices(index, shape)
    if rule.per_layer:
      out = np.stack([block(rule.hf.format(layer=layer), index[1:])
                      for layer in range(*index[0].indices(shape[0]))])
    else:
      out = block(rule.hf, index)
    return np.ascontiguousarray(out.astype(np_dtype))
  return read


def load_hf_params(folder: str, mesh=None, dtype: str = 'float32'):
  """(graphdef, params, model_config) of a HF checkpoint, each param in its `mesh` sharding.

  mesh=None shards over all devices (fsdp). Raises before reading data if config, tensor names
  or shapes disagree.
  """
  cfg = config_from_hf(read_config(folder), dtype)
  mesh = mesh or mesh_lib.make_mesh({'fsdp': -1})
  files = _weight_files(folder)
  expected = expected_tensors(cfg)
  graphdef, abstract = sharded.abstract_model(cfg)
  shardings = sharded.param_shardings(abstract, mesh)
  with contextlib.ExitStack() as stack:
    handles = {path: stack.enter_context(_open(path)) for path in sorted(set(files.values()))}
    _check_tensors(expected, handles, files, cfg)

    def place(key_path, leaf, sharding):
      path = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
      read = _reader(_RULE_BY_PATH[path], leaf.shape, handles, files, np.dtype(leaf.dtype))
      return jax.make_array_from_callback(leaf.shape, sharding, read)

    params = jax.tree_util.tree_map_with_path(place, abstract, shardings)
  return graphdef, params, cfg


def load_hf(folder: str, dtype: str = 'float32', mesh=None):
  """A Transformer holding a HF checkpoint; model(tokens [B, T]) gives logits [B, T, V]."""
  graphdef, params, _ = load_hf_params(folder, mesh, dtype)
  return nnx.merge(graphdef, params)


# ---- writing checkpoints -----------------------------------------------------------------------

def _to_host(x) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_tensors(params, cfg: ModelConfig, *, qkv_bias: bool = False) -> dict[str, np.ndarray]:
  """HF-named, HF-layout numpy tensors of framework `params` (an nnx.State), in param dtype.

  qkv_bias=True adds zero q/k/v biases to a bias-free model (for formats that require them).
  """
  flat = {tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey)): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  out = {}
  for path, leaf in flat.items():
    rule, value = _RULE_BY_PATH[path], _to_host(leaf)
    for layer in (range(cfg.n_layers) if rule.per_layer else [None]):
      block = value[layer] if rule.per_layer else value
      out[rule.hf.format(layer=layer)] = np.ascontiguousarray(block.T if rule.transpose else block)
  if qkv_bias and not cfg.qkv_bias:
    dtype = out['model.norm.weight'].dtype
    for name, (_, _, shape) in expected_tensors(dataclasses.replace(cfg, qkv_bias=True)).items():
      out.setdefault(name, np.zeros(shape, dtype))
  return out


def save_hf(model, folder: str, tokenizer=None, architecture: str | None = None):
  """Writes `model` (a Transformer) as a HF checkpoint folder.

  architecture: one of ARCHITECTURES; None picks Qwen3 for q/k norm, Qwen2 for qkv bias, else
  Llama. A bias-free model saved as Qwen2ForCausalLM gets zero q/k/v biases.
  tokenizer: an HFTokenizer or a folder; its tokenizer files are copied and its special ids
  written to config.json. Every process must call this; process 0 writes.
  """
  cfg = model.config
  architecture = architecture or default_architecture(cfg)
  special = None
  if tokenizer is not None:
    from distill.data.hf_tokenizer import HFTokenizer
    tokenizer = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer(tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(f'tokenizer has {tokenizer.vocab_size} tokens but the model only '
                       f'{cfg.vocab_size}')
    special = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id)
  config = hf_config(cfg, architecture, special)
  tensors = hf_tensors(nnx.state(model, nnx.Param), cfg,
                       qkv_bias=architecture == 'Qwen2ForCausalLM')
  if jax.process_index() != 0:
    return
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, SINGLE_FILE), metadata={'format': 'pt'})
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  if tokenizer is not None:
    for name in tokenizer.files:
      shutil.copy(os.path.join(tokenizer.folder, name), os.path.join(folder, name))
