"""A GGUF file back as a JAX Transformer: gguf's dequantizer, then the export's layout undone.

    graphdef, params, cfg = load_gguf('student-q4_k_m.gguf')            # llama / qwen2 / qwen3
    graphdef, params, cfg = load_gguf(path, model_config=reference_cfg)  # any exported family

The weights are exactly what llama.cpp reads (each tensor dequantized to float32 by
`gguf.quants.dequantize`), mapped back through the names and layout distill.models.gguf_arch
writes: GGUF -> HF names by gguf's name map, the 'llama' q/k row permutation inverted, Gemma's
stored 1 + w norms less 1, then HF -> framework by distill.models.hf's weight rules. The model's
shape comes from the file's metadata for llama / qwen2 / qwen3; other families need the
ModelConfig of the model that was exported (e.g. the unquantized student's).
"""
from __future__ import annotations

import hashlib
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from distill.models import gguf_arch, gguf_export, hf, sharded
from distill.models.config import ModelConfig

_FROM_METADATA = ('llama', 'qwen2', 'qwen3')


def _field(reader: gguf.GGUFReader, key: str):
  field = reader.fields.get(key)
  return None if field is None else field.contents()


def architecture(reader: gguf.GGUFReader) -> str:
  return _field(reader, 'general.architecture')


def config_from_metadata(reader: gguf.GGUFReader) -> ModelConfig:
  """The ModelConfig of a llama / qwen2 / qwen3 file written by the export."""
  arch = architecture(reader)
  if arch not in _FROM_METADATA:
    raise ValueError(f'the model shape of a {arch!r} GGUF is not read from its metadata (only '
                     f'{", ".join(_FROM_METADATA)}); pass the exported model\'s run '
                     '(--reference=WORKDIR)')
  if _field(reader, f'{arch}.rope.scaling.type') not in (None, 'none') or any(
      t.name == 'rope_freqs.weight' for t in reader.tensors):
    raise ValueError('a GGUF with RoPE scaling needs the exported model\'s run '
                     '(--reference=WORKDIR)')
  get = lambda key: _field(reader, f'{arch}.{key}')
  names = {t.name for t in reader.tensors}
  return ModelConfig(
      vocab_size=int(get('vocab_size') or len(_field(reader, 'tokenizer.ggml.tokens'))),
      d_model=int(get('embedding_length')), n_layers=int(get('block_count')),
      n_heads=int(get('attention.head_count')), n_kv_heads=int(get('attention.head_count_kv')),
      d_ff=int(get('feed_forward_length')), head_dim=int(get('attention.key_length')),
      max_seq_len=int(get('context_length')), rope_theta=float(get('rope.freq_base')),
      norm_eps=float(get('attention.layer_norm_rms_epsilon')), qk_norm=arch == 'qwen3',
      qkv_bias='blk.0.attn_q.bias' in names, tie_embeddings='output.weight' not in names)


def _fingerprint(tokens: list[str]) -> str:
  return 'gguf-' + hashlib.sha256('\x00'.join(tokens).encode()).hexdigest()[:16]


def check_tokenizer(path: str, tokenizer, whose: str):
  """Refuses the GGUF file `path` unless its vocabulary is the one `tokenizer` (`whose`, e.g.
  "the teacher's") exports as: the same tokens at the same ids and the same BOS/EOS/pad ids.
  Reads the file's metadata only, so a mismatch is named before anything compiles."""
  reader = gguf.GGUFReader(path)
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  if tokens is None:
    raise ValueError(f'{path} holds no vocabulary (exported without a tokenizer): cannot tell '
                     f'whether it reads text as {whose} tokenizer ({tokenizer.fingerprint()}) does')
  theirs = f'{whose} tokenizer {tokenizer.fingerprint()} ({tokenizer.vocab_size} tokens)'
  ours = f'the GGUF\'s {_fingerprint(tokens)} ({len(tokens)} tokens)'
  if tokenizer.vocab_size > len(tokens):
    raise ValueError(f'{path}: its tokenizer differs from {whose}: {ours}, {theirs}')
  try:
    expected = gguf_export.token_list(tokenizer, len(tokens))
  except ValueError as e:   # a tokenizer the export cannot write: no GGUF holds it
    raise ValueError(f'{path}: its tokenizer cannot be {whose} ({e})') from e
  for i, (got, want) in enumerate(zip(tokens, expected)):
    if got != want:
      raise ValueError(f'{path}: its tokenizer differs from {whose}: token {i} is {got!r} in the '
                       f'GGUF, {want!r} in {whose}; {ours}, {theirs}')
  for name in ('bos', 'eos', 'pad'):
    got, want = _field(reader, f'tokenizer.ggml.{name}_token_id'), getattr(tokenizer, f'{name}_id')
    if got is not None and int(got) != want:
      raise ValueError(f'{path}: its {name.upper()} id is {got}, {whose} tokenizer\'s {want}; '
                       f'{ours}, {theirs}')


def hf_named_tensors(reader: gguf.GGUFReader, cfg: ModelConfig, arch: str) -> dict:
  """HF-named float32 tensors of the file, in HF layout, as the framework computes them."""
  architecture_name = 'Phi3ForCausalLM' if arch == 'phi3' else 'LlamaForCausalLM'
  expected = hf.expected_tensors(cfg, hf.weight_rules(cfg, architecture_name))
  names = gguf.get_tensor_name_map(gguf_arch.ARCHS[arch], cfg.n_layers)
  by_name = {t.name: t for t in reader.tensors}
  if gguf_arch.query_rescale(cfg, arch) != 1.0:
    raise ValueError(f'the {arch} export folds a query rescale into the weights; evaluating it '
                     'back in JAX is not supported')
  out = {}
  for hf_name, shape in expected.items():
    name = names.get_name(hf_name, try_suffixes=('.weight', '.bias'))
    if name not in by_name:
      raise ValueError(f'{name} (HF {hf_name}) is missing from the GGUF: not a file of this model')
    tensor = by_name[name]
    value = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    value = value.reshape(shape)
    if arch == 'llama' and ('.q_proj.' in hf_name or '.k_proj.' in hf_name):
      heads = cfg.n_heads if '.q_proj.' in hf_name else cfg.n_kv_heads
      # The inverse of gguf_arch.permute_for_norm_rope: adjacent pairs back to rotate_half.
      value = (value.reshape(heads, value.shape[0] // heads // 2, 2, *value.shape[1:])
               .swapaxes(1, 2).reshape(value.shape))
    if cfg.norm_plus_one and hf_name.endswith('norm.weight'):
      value = value - 1
    out[hf_name] = value
  return out


def framework_params(tensors: dict, cfg: ModelConfig, architecture_name: str):
  """(graphdef, params) of HF-named tensors, by distill.models.hf's weight rules."""
  rules = hf.weight_rules(cfg, architecture_name)
  graphdef, abstract = sharded.abstract_model(cfg)

  def leaf(key_path, shape_dtype):
    rule = rules[hf._path(key_path)]

    def one(layer):
      value = tensors[rule.hf.format(layer=layer)]
      if rule.fused:   # this part's rows of the fused tensor
        start = rule.offset(cfg)
        value = value[start:start + shape_dtype.shape[-1]]
      return value.T if rule.transpose else value

    value = np.stack([one(i) for i in range(cfg.n_layers)]) if rule.per_layer else one(None)
    return jnp.asarray(value, shape_dtype.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(leaf, abstract)


def load_gguf(path: str, model_config: ModelConfig | None = None):
  """(graphdef, params, model_config) of the GGUF file `path`, dequantized."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no GGUF file {path!r}')
  reader = gguf.GGUFReader(path)
  arch = architecture(reader)
  cfg = model_config or config_from_metadata(reader)
  if arch != gguf_arch.default_arch(cfg):
    raise ValueError(f'{path} is a {arch!r} GGUF, the given model exports as '
                     f'{gguf_arch.default_arch(cfg)!r}: not the same model')
  tensors = hf_named_tensors(reader, cfg, arch)
  graphdef, params = framework_params(
      tensors, cfg, 'Phi3ForCausalLM' if arch == 'phi3' else 'LlamaForCausalLM')
  return graphdef, params, cfg
