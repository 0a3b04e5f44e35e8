"""Hugging Face checkpoints in and out: Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 (text) /
Phi-3 (dense), without torch.

The weight mapping is data (`WeightRule`s, chosen per config and architecture by
`weight_rules`), read in both directions. HF's nn.Linear stores [out, in] and the framework
[in, out] with heads flattened in HF order, so every mapping is the identity or a transpose (of
a row range, for Phi-3's fused projections), and per-layer tensors stack along the framework's
leading layer axis. config.json is translated by distill.models.hf_config.

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

from distill.data.hf_tokenizer import HFTokenizer
from distill.models import hf_config as hf_config_lib
from distill.models import sharded
from distill.models.config import ModelConfig
# The config.json side, re-exported: callers use hf.config_from_hf and friends.
from distill.models.hf_config import (ARCHITECTURES, LOAD_DTYPES, config_from_hf,  # noqa: F401
                                      default_architecture, hf_config)
from distill.parallel import mesh as mesh_lib

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
  fused: the layer parameters that HF concatenates along its output axis into this one tensor,
    in order (Phi-3's qkv_proj and gate_up_proj); path is one of them. () = not fused.
  """
  hf: str
  path: tuple[str, ...]
  transpose: bool = False
  when: str | None = None
  fused: tuple[str, ...] = ()

  @property
  def per_layer(self) -> bool:
    return '{layer}' in self.hf

  def applies(self, cfg: ModelConfig) -> bool:
    if self.when is None:
      return True
    negate, flag = self.when.startswith('not '), self.when.removeprefix('not ')
    return bool(getattr(cfg, flag)) != negate

  def offset(self, cfg: ModelConfig) -> int:
    """Where this parameter's rows start in the fused HF tensor (0 when not fused)."""
    before = self.fused[:self.fused.index(self.path[-1])] if self.fused else ()
    return sum(_param_shape(cfg, ('layers', name))[-1] for name in before)


_LAYER, _ATTN, _MLP = 'model.layers.{layer}.', 'model.layers.{layer}.self_attn.', \
    'model.layers.{layer}.mlp.'
_COMMON = (
    WeightRule('model.embed_tokens.weight', ('embed',)),
    WeightRule('model.norm.weight', ('final_norm',)),
    WeightRule('lm_head.weight', ('unembed',), transpose=True, when='not tie_embeddings'),
    WeightRule(_LAYER + 'input_layernorm.weight', ('layers', 'attn_norm')),
    WeightRule(_ATTN + 'o_proj.weight', ('layers', 'wo'), transpose=True),
    WeightRule(_ATTN + 'q_proj.bias', ('layers', 'bq'), when='qkv_bias'),
    WeightRule(_ATTN + 'k_proj.bias', ('layers', 'bk'), when='qkv_bias'),
    WeightRule(_ATTN + 'v_proj.bias', ('layers', 'bv'), when='qkv_bias'),
    WeightRule(_ATTN + 'o_proj.bias', ('layers', 'bo'), when='o_bias'),
    WeightRule(_ATTN + 'q_norm.weight', ('layers', 'q_norm'), when='qk_norm'),
    WeightRule(_ATTN + 'k_norm.weight', ('layers', 'k_norm'), when='qk_norm'),
    # Gemma names its norm before the MLP pre_feedforward_layernorm and uses
    # post_attention_layernorm on the attention output; Llama's is the norm before the MLP.
    WeightRule(_LAYER + 'post_attention_layernorm.weight', ('layers', 'mlp_norm'),
               when='not post_norms'),
    WeightRule(_LAYER + 'pre_feedforward_layernorm.weight', ('layers', 'mlp_norm'),
               when='post_norms'),
    WeightRule(_LAYER + 'post_attention_layernorm.weight', ('layers', 'attn_post_norm'),
               when='post_norms'),
    WeightRule(_LAYER + 'post_feedforward_layernorm.weight', ('layers', 'mlp_post_norm'),
               when='post_norms'),
    WeightRule(_MLP + 'down_proj.weight', ('layers', 'w_down'), transpose=True),
)
_SEPARATE = tuple(WeightRule(hf, ('layers', name), transpose=True) for hf, name in (
    (_ATTN + 'q_proj.weight', 'wq'), (_ATTN + 'k_proj.weight', 'wk'),
    (_ATTN + 'v_proj.weight', 'wv'), (_MLP + 'gate_proj.weight', 'w_gate'),
    (_MLP + 'up_proj.weight', 'w_up')))
_FUSED = tuple(WeightRule(hf, ('layers', name), transpose=True, fused=fused)
               for hf, fused in ((_ATTN + 'qkv_proj.weight', ('wq', 'wk', 'wv')),
                                 (_MLP + 'gate_up_proj.weight', ('w_gate', 'w_up')))
               for name in fused)


def weight_rules(cfg: ModelConfig, architecture: str) -> dict[tuple[str, ...], WeightRule]:
  """Framework path -> rule of every tensor a checkpoint of `cfg` as `architecture` holds."""
  projections = _FUSED if architecture == 'Phi3ForCausalLM' else _SEPARATE
  return {rule.path: rule for rule in _COMMON + projections if rule.applies(cfg)}


# ---- tensor names and shapes -------------------------------------------------------------------

def _param_shape(cfg: ModelConfig, path: tuple[str, ...]) -> tuple[int, ...]:
  V, D, F = cfg.vocab_size, cfg.d_model, cfg.d_ff
  HD, KD, Dh = cfg.n_heads * cfg.resolved_head_dim, cfg.n_kv_heads * cfg.resolved_head_dim, \
      cfg.resolved_head_dim
  per_layer = dict(attn_norm=(D,), mlp_norm=(D,), wq=(D, HD), wk=(D, KD), wv=(D, KD), wo=(HD, D),
                   bq=(HD,), bk=(KD,), bv=(KD,), bo=(D,), q_norm=(Dh,), k_norm=(Dh,),
                   attn_post_norm=(D,), mlp_post_norm=(D,), w_gate=(D, F), w_up=(D, F),
                   w_down=(F, D))
  if path[0] == 'layers':
    return per_layer[path[1]]
  return {'embed': (V, D), 'final_norm': (D,), 'unembed': (D, V)}[path[0]]


def expected_tensors(cfg: ModelConfig, rules: dict) -> dict[str, tuple]:
  """HF name -> HF shape of every tensor a checkpoint of `cfg` holds under `rules`."""
  out = {}
  for rule in rules.values():
    shape = _param_shape(cfg, rule.path)
    shape = shape[::-1] if rule.transpose else shape
    if rule.fused:   # the parts stack along HF's output axis
      shape = (sum(_param_shape(cfg, ('layers', n))[-1] for n in rule.fused),) + shape[1:]
    for layer in (range(cfg.n_layers) if rule.per_layer else [None]):
      out[rule.hf.format(layer=layer)] = shape
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
  for name, shape in expected.items():
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


def _reader(rule: WeightRule, offset: int, shape, handles, files, np_dtype):
  """Callback for make_array_from_callback: the framework-layout block at `index`."""
  def block(name, index):
    # framework [i0:i1, j0:j1] is HF [j0:j1, i0:i1] transposed; a fused part's HF rows start
    # at its offset.
    hf_index = index[::-1] if rule.transpose else index
    first = slice(hf_index[0].start + offset, hf_index[0].stop + offset)
    out = handles[files[name]].get_slice(name)[(first,) + hf_index[1:]]
    return out.T if rule.transpose else out

  def read(index):
    index = _slices(index, shape)
    if rule.per_layer:
      out = np.stack([block(rule.hf.format(layer=layer), index[1:])
                      for layer in range(*index[0].indices(shape[0]))])
    else:
      out = block(rule.hf, index)
    return np.ascontiguousarray(out.astype(np_dtype))
  return read


def load_dtype_name(dtype) -> str:
  """The name of a load dtype given as a name or as a JAX / NumPy dtype (jnp.bfloat16 ...)."""
  try:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  except TypeError:
    name = None
  if name not in LOAD_DTYPES:
    raise ValueError(f'dtype must be one of {LOAD_DTYPES} (a name, or the JAX / NumPy dtype), '
                     f'got {dtype!r}')
  return name


def load_hf_params(folder: str, mesh=None, dtype='float32', axis_rules=mesh_lib.DEFAULT_RULES):
  """(graphdef, params, model_config) of a HF checkpoint, each param in its `mesh` sharding
  (by the logical-axis rules `axis_rules`).

  mesh=None shards over all devices (fsdp). dtype: a name in LOAD_DTYPES or the JAX / NumPy
  dtype. Raises before reading data if config, tensor names or shapes disagree.
  """
  hf = read_config(folder)
  cfg = config_from_hf(hf, load_dtype_name(dtype))
  mesh = mesh or mesh_lib.make_mesh({'fsdp': -1})
  files = _weight_files(folder)
  rules = weight_rules(cfg, hf_config_lib.architecture(hf))
  graphdef, abstract = sharded.abstract_model(cfg)
  shardings = sharded.param_shardings(abstract, mesh, axis_rules)
  with contextlib.ExitStack() as stack:
    handles = {path: stack.enter_context(_open(path)) for path in sorted(set(files.values()))}
    _check_tensors(expected_tensors(cfg, rules), handles, files, cfg)

    def place(key_path, leaf, sharding):
      rule = rules[_path(key_path)]
      read = _reader(rule, rule.offset(cfg), leaf.shape, handles, files, np.dtype(leaf.dtype))
      return jax.make_array_from_callback(leaf.shape, sharding, read)

    params = jax.tree_util.tree_map_with_path(place, abstract, shardings)
  return graphdef, params, cfg


def load_hf(folder: str, dtype='float32', mesh=None):
  """A Transformer holding a HF checkpoint; model(tokens [B, T]) gives logits [B, T, V].
  dtype: 'float32' / 'bfloat16' / 'float16' or the JAX / NumPy dtype (jnp.bfloat16 ...)."""
  graphdef, params, _ = load_hf_params(folder, mesh, dtype)
  return nnx.merge(graphdef, params)


# ---- writing checkpoints -----------------------------------------------------------------------

def _path(key_path) -> tuple[str, ...]:
  return tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))


def _first(pair):
  return pair[0]


def _to_host(x) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_tensors(params, cfg: ModelConfig, *, qkv_bias: bool = False,
               architecture: str = 'LlamaForCausalLM') -> dict[str, np.ndarray]:
  """HF-named, HF-layout numpy tensors of framework `params` (an nnx.State), in param dtype.

  qkv_bias=True adds zero q/k/v biases to a bias-free model (for formats that require them).
  """
  rules = weight_rules(cfg, architecture)
  parts = {}   # HF name -> [(offset, HF-layout block)]
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    rule, value = rules[_path(key_path)], _to_host(leaf)
    for layer in (range(cfg.n_layers) if rule.per_layer else [None]):
      block = value[layer] if rule.per_layer else value
      parts.setdefault(rule.hf.format(layer=layer), []).append(
          (rule.offset(cfg), block.T if rule.transpose else block))
  # A fused tensor's parts concatenate in the order of their offsets.
  out = {name: np.ascontiguousarray(np.concatenate([b for _, b in sorted(blocks, key=_first)]))
         for name, blocks in parts.items()}
  if qkv_bias and not cfg.qkv_bias:
    dtype = out['model.norm.weight'].dtype
    biased = dataclasses.replace(cfg, qkv_bias=True)
    for name, shape in expected_tensors(biased, weight_rules(biased, architecture)).items():
      out.setdefault(name, np.zeros(shape, dtype))
  return out


def save_hf(model, folder: str, tokenizer=None, architecture: str | None = None,
            model_card: str | None = None):
  """Writes `model` (a Transformer) as a HF checkpoint folder.

  architecture: one of ARCHITECTURES; None picks Gemma3 / Gemma2 for Gemma-style models (with /
  without q/k norm), Phi3 for partial rotary, Qwen3 for q/k norm, Qwen2 for qkv bias without
  o_proj bias, Mistral for sliding-window attention in every layer, else Llama. A bias-free
  model saved as Qwen2ForCausalLM gets zero q/k/v biases; Phi3ForCausalLM fuses qkv_proj and
  gate_up_proj.
  tokenizer: an HFTokenizer or a folder; its tokenizer files are copied and its special ids
  written to config.json. model_card: the README.md text (distill.provenance.model_card writes
  the student's lineage). Every process must call this; process 0 writes.
  """
  cfg = model.config
  architecture = architecture or default_architecture(cfg)
  special = None
  if tokenizer is not None:
    tokenizer = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer(tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(f'tokenizer has {tokenizer.vocab_size} tokens but the model only '
                       f'{cfg.vocab_size}')
    special = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id)
  config = hf_config(cfg, architecture, special)
  tensors = hf_tensors(nnx.state(model, nnx.Param), cfg,
                       qkv_bias=architecture == 'Qwen2ForCausalLM', architecture=architecture)
  if jax.process_index() != 0:
    return
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, SINGLE_FILE), metadata={'format': 'pt'})
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  if model_card is not None:
    with open(os.path.join(folder, 'README.md'), 'w', encoding='utf-8') as f:
      f.write(model_card)
  if tokenizer is not None:
    for name in tokenizer.files:
      shutil.copy(os.path.join(tokenizer.folder, name), os.path.join(folder, name))
