"""GGUF export (llama.cpp) of a Transformer, through the `gguf` package.

Tensors go through the Hugging Face naming of distill.models.hf and then gguf's own HF -> GGUF
name map (token_embd, blk.N.attn_q, ..., output_norm, output), in HF [out, in] layout, which is
what llama.cpp's convert_hf_to_gguf.py writes. Two conventions follow that converter:

* RoPE layout. HF rotates pairs (i, i + Dh/2) ("rotate_half"). llama.cpp's 'llama' architecture
  uses LLAMA_ROPE_TYPE_NORM, rotating adjacent pairs (2i, 2i+1), so the converter's LlamaModel
  permutes the rows of q_proj and k_proj (weights and biases) within each head,
  reshape(heads, 2, Dh/2, ...).swapaxes(1, 2); the dot products q.k are unchanged. 'qwen2' and
  'qwen3' use LLAMA_ROPE_TYPE_NEOX (rotate_half) and their converter copies q/k as they are.
* Types. 1-D tensors (norms, biases) stay F32. 2-D weights follow llama-quantize's per-tensor mix
  for the file type (`tensor_type`), quantised by distill.models.gguf_quants to the bytes
  llama.cpp's reference quantizer writes.
* Llama 3.1/3.2 rope scaling ('llama3') is the F32 tensor rope_freqs.weight of per-frequency
  divisors (`rope_freq_divisors`), which llama.cpp's 'llama' applies to every layer. Other
  rope_scaling types are refused.

The vocabulary is written as llama.cpp's 'gpt2' (byte-level BPE) tokenizer: tokens, types,
merges, special ids and the chat template, with ids the model has beyond the tokenizer written as
'[PAD{i}]' (as the converter does). llama.cpp does not run tokenizer.json's pre-tokenizer; it
picks a built-in one by the name in tokenizer.ggml.pre, which is recognised here from the split
regex (Llama 3 'llama-bpe', Qwen2/2.5/3 'qwen2', plain byte-level 'gpt-2') or given explicitly.
The embedded tasks' CharTokenizer is written the same way, one token per character and no merge
that applies (`_char_vocab`).
Run the file with e.g. `llama-cli -m student.gguf -cnv` (the chat template is in the file).
"""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from typing import NamedTuple

import gguf
import jax
import numpy as np
from flax import nnx
from tokenizers import pre_tokenizers

from distill.data.tokenizer import BOS, EOS, PAD, CharTokenizer
from distill.models import gguf_quants, hf
from distill.models.config import ModelConfig

Q = gguf.GGMLQuantizationType
# --type name -> (general.file_type, the type of the tensors the mix leaves alone).
FILE_TYPES = {
    'f32': (gguf.LlamaFileType.ALL_F32, Q.F32),
    'f16': (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    'q8_0': (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    'q6_k': (gguf.LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
    'q5_k_m': (gguf.LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K),
    'q4_k_m': (gguf.LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
    'q4_0': (gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
}
# llama.cpp's replacement for a type whose block does not divide a tensor's rows; F16 when the
# replacement does not fit either.
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
ARCHS = {'llama': gguf.MODEL_ARCH.LLAMA, 'qwen2': gguf.MODEL_ARCH.QWEN2,
         'qwen3': gguf.MODEL_ARCH.QWEN3}
# llama.cpp pre-tokenizer names of known byte-level BPE split regexes (Llama 3, Qwen2/2.5/3).
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": 'llama-bpe',
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": 'qwen2',
}


# ModelConfig fields that the metadata written here describes, or that do not change what the
# model computes. Any other field away from its default (a newer family's option: RoPE scaling,
# sliding windows, Gemma's norms and soft-caps, ...) would be dropped, and llama.cpp would run a
# different model, so the export refuses it. The exception is rope_scaling of type 'llama3'
# (Llama 3.1/3.2), which llama.cpp's 'llama' reads as the rope_freqs tensor written here.
_DESCRIBED_FIELDS = frozenset({
    'vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'head_dim',
    'max_seq_len', 'rope_theta', 'norm_eps', 'qk_norm', 'qkv_bias', 'tie_embeddings', 'dtype',
    'param_dtype', 'remat', 'scan_unroll'})


def default_arch(cfg: ModelConfig) -> str:
  return 'qwen3' if cfg.qk_norm else 'qwen2' if cfg.qkv_bias else 'llama'


def _rope_type(cfg: ModelConfig) -> str | None:
  return cfg.rope_scaling_dict.get('rope_type') if cfg.rope_scaling else None


def _check_arch(cfg: ModelConfig, arch: str):
  undescribed = sorted(f.name for f in dataclasses.fields(cfg) if f.name not in _DESCRIBED_FIELDS
                       and getattr(cfg, f.name) != f.default)
  # Llama 3.1/3.2 rope scaling is written as the rope_freqs tensor (`rope_freq_divisors`).
  if 'rope_scaling' in undescribed and _rope_type(cfg) == 'llama3':
    undescribed.remove('rope_scaling')
  if undescribed:
    named = [f'rope_scaling ({_rope_type(cfg)!r}; only llama3 exports)' if n == 'rope_scaling'
             else n for n in undescribed]
    raise ValueError(f'GGUF export does not write {", ".join(named)} (set on this model); '
                     'llama.cpp would run the model without them')
  if arch not in ARCHS:
    raise ValueError(f'GGUF architecture must be one of {list(ARCHS)}, got {arch!r}')
  if _rope_type(cfg) == 'llama3' and arch != 'llama':
    raise ValueError(f"llama3 rope scaling exports only as architecture 'llama' (llama.cpp's "
                     f"{arch!r} does not read rope_freqs), got {arch!r}")
  if cfg.qk_norm != (arch == 'qwen3'):
    raise ValueError(f'GGUF architecture {arch!r} does not match the model: qk_norm={cfg.qk_norm} '
                     "(q/k-norm models are 'qwen3', and only they)")
  if cfg.qkv_bias and arch == 'qwen3':
    raise ValueError("llama.cpp's 'qwen3' has no q/k/v biases")


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
  if _rope_type(cfg) != 'llama3':
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


def permute_for_norm_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Rows of a q/k projection (weight [H*Dh, D] or bias [H*Dh]) from HF's rotate_half order
  to llama.cpp's adjacent-pair order, per head."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(params, cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
  """GGUF-named float32 tensors (HF layout, q/k permuted for 'llama')."""
  tensors = hf.hf_tensors(params, cfg, qkv_bias=arch == 'qwen2')
  name_map = gguf.get_tensor_name_map(ARCHS[arch], cfg.n_layers)
  out = {}
  divisors = rope_freq_divisors(cfg)
  if divisors is not None:
    out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + '.weight'] = divisors
  for name, value in tensors.items():
    value = value.astype(np.float32)
    if arch == 'llama':
      if '.q_proj.' in name:
        value = permute_for_norm_rope(value, cfg.n_heads)
      elif '.k_proj.' in name:
        value = permute_for_norm_rope(value, cfg.n_kv_heads)
    out[name_map.get_name(name, try_suffixes=('.weight', '.bias'))] = value
  return out


class TypeFallbackWarning(UserWarning):
  """A tensor written in another type than the mix gives it, because its rows do not fit."""


def file_type_key(file_type: str) -> str:
  """The FILE_TYPES key of a --type name, any case."""
  if file_type.lower() not in FILE_TYPES:
    raise ValueError(f'unknown GGUF file type {file_type!r}; known: {", ".join(FILE_TYPES)}')
  return file_type.lower()


def _use_more_bits(layer: int, n_layers: int) -> bool:
  """llama.cpp's layers that get more bits: the first and last eighth, and every third layer
  in between (integer eighths, as in C)."""
  eighth = n_layers // 8
  return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], file_type: str, n_layers: int,
                has_output: bool) -> tuple[Q, Q | None]:
  """(type, the type it fell back from or None) of a GGUF tensor in a `file_type` file.

  The rule is llama-quantize's (llama.cpp's llama_tensor_get_type) for dense models, so a file
  written here has the types llama.cpp gives the same model from an F32 GGUF:
  * 1-D tensors (norms, biases) are F32; f32 and f16 files store every matrix in that type.
  * The output matrix (token_embd when it doubles as the output, i.e. no output.weight) is Q6_K
    in every quantised type but Q8_0, where it stays Q8_0; Q8_0 when its rows do not fit the
    file type's block.
  * Q4_K_M and Q5_K_M: attn_v and ffn_down of layer i are Q6_K when i is in the first or last
    eighth of the layers or (i - n_layers/8) % 3 == 2 (`_use_more_bits`); the rest are Q4_K
    and Q5_K.
  * Every other matrix has the file type's own type.
  * A type whose block does not divide the rows (the last dimension) falls back: Q4_K to Q5_0,
    Q5_K to Q5_1, Q6_K to Q8_0, and to F16 when 32 does not divide them either.
  llama.cpp's further rules are for mixture-of-experts and Falcon models, which do not export
  here, and for 80-layer GQA ("70B") models, whose attn_v it raises from Q4_K to Q5_K; that one
  is left out.
  """
  base = FILE_TYPES[file_type][1]
  if len(shape) == 1 or base in (Q.F32, Q.F16):
    return (Q.F32 if len(shape) == 1 else base), None
  cols = shape[-1]
  qtype = base
  layer = re.match(r'blk\.(\d+)\.', name)
  if name == 'output.weight' or (name == 'token_embd.weight' and not has_output):
    if cols % gguf_quants.block_size(base):
      qtype = Q.Q8_0
    elif base != Q.Q8_0:
      qtype = Q.Q6_K
  elif (file_type in ('q4_k_m', 'q5_k_m') and layer and
        name.endswith(('.attn_v.weight', '.ffn_down.weight')) and
        _use_more_bits(int(layer.group(1)), n_layers)):
    qtype = Q.Q6_K
  if cols % gguf_quants.block_size(qtype) == 0:
    return qtype, None
  fallback = _FALLBACK.get(qtype, Q.F16)
  if cols % gguf_quants.block_size(fallback):
    fallback = Q.F16
  return fallback, qtype


def _encode(value: np.ndarray, qtype: Q) -> np.ndarray:
  if qtype == Q.F32:
    return value
  if qtype == Q.F16:
    return value.astype(np.float16)
  return gguf_quants.quantize(value, qtype)


def _pre_tokenizer_name(pre_tokenizer: dict) -> str:
  """llama.cpp's name for a tokenizer.json pre-tokenizer: a known Split regex, else GPT-2's
  regex when ByteLevel splits with its own, else 'default'."""
  parts = pre_tokenizer.get('pretokenizers', [pre_tokenizer])
  for part in parts:
    regex = (part.get('pattern') or {}).get('Regex')
    if part.get('type') == 'Split' and regex in _PRE_TOKENIZERS:
      return _PRE_TOKENIZERS[regex]
  if any(p.get('type') == 'ByteLevel' and p.get('use_regex', True) for p in parts):
    return 'gpt-2'
  return 'default'


class _Vocab(NamedTuple):
  """A vocabulary as llama.cpp's 'gpt2' tokenizer reads it."""
  token_by_id: dict[int, str]
  control_ids: set[int]
  user_defined_ids: set[int]
  merges: list[str]
  pre: str                      # llama.cpp's pre-tokenizer name


def _hf_vocab(tokenizer) -> _Vocab:
  """The vocabulary of a byte-level BPE HFTokenizer."""
  spec = json.loads(tokenizer.tokenizer.to_str())
  model = spec.get('model') or {}
  if model.get('type') != 'BPE' or model.get('byte_fallback') or \
      (spec.get('decoder') or {}).get('type') != 'ByteLevel':
    raise ValueError(f'only byte-level BPE tokenizers (GPT-2 / Llama 3 / Qwen style) export to '
                     f'GGUF; {tokenizer.folder!r} has model {model.get("type")!r}, decoder '
                     f'{(spec.get("decoder") or {}).get("type")!r}')
  by_id = {i: t for t, i in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items()}
  added = tokenizer.tokenizer.get_added_tokens_decoder()
  control = {i for i, t in added.items() if t.special}
  merges = [m if isinstance(m, str) else ' '.join(m) for m in model.get('merges', [])]
  return _Vocab(by_id, control, set(added) - control, merges,
                _pre_tokenizer_name(spec.get('pre_tokenizer') or {}))


def _char_vocab(tokenizer: CharTokenizer) -> _Vocab:
  """The CharTokenizer as a llama.cpp 'gpt2' vocabulary.

  llama.cpp's BPE tokenizer splits text into characters and joins neighbours only by listed
  merges, then looks each piece up; with no merge that applies every character becomes its own
  token, which is CharTokenizer.encode, and characters outside the vocabulary are dropped.
  (Its SentencePiece form, 'llama', would prefix a space and abort on an unknown character
  without byte tokens.) Tokens are spelled in GPT-2's byte-level alphabet, which llama.cpp's BPE
  reads and decodes: ' ' is 'Ġ'. llama.cpp requires a merges list and gguf cannot write an
  empty one, so it holds one merge that never fires: '<pad>' and '<eos>' are not single
  characters, and no other merge can build them.
  """
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  by_id = {tokenizer.pad_id: PAD, tokenizer.bos_id: BOS, tokenizer.eos_id: EOS}
  for char in tokenizer.chars:
    (spelled, _), = byte_level.pre_tokenize_str(char)
    by_id[tokenizer.token_id(char)] = spelled
  return _Vocab(by_id, {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}, set(),
                [f'{PAD} {EOS}'], 'default')


def _tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre: str | None):
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f'tokenizer has {tokenizer.vocab_size} tokens, the model only {vocab_size}')
  vocab = _char_vocab(tokenizer) if isinstance(tokenizer, CharTokenizer) else _hf_vocab(tokenizer)
  tokens, types = [], []
  for i in range(vocab_size):
    tokens.append(vocab.token_by_id.get(i, f'[PAD{i}]'))
    types.append(gguf.TokenType.USER_DEFINED
                 if i not in vocab.token_by_id or i in vocab.user_defined_ids else
                 gguf.TokenType.CONTROL if i in vocab.control_ids else gguf.TokenType.NORMAL)
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre(pre or vocab.pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(vocab.merges)
  writer.add_bos_token_id(tokenizer.bos_id)
  writer.add_eos_token_id(tokenizer.eos_id)
  writer.add_pad_token_id(tokenizer.pad_id)
  # The batch pipeline puts BOS before every prompt unless the tokenizer says otherwise.
  writer.add_add_bos_token(getattr(tokenizer, 'add_bos', True))
  writer.add_add_eos_token(False)
  if getattr(tokenizer, 'chat_template', None) is not None:
    writer.add_chat_template(tokenizer.chat_template.source)


def export_gguf(model, path: str, *, tokenizer=None, file_type: str = 'f16',
                arch: str | None = None, name: str = 'distill-student',
                tokenizer_pre: str | None = None) -> dict[str, str]:
  """Writes `model` (a Transformer) to the GGUF file `path`; returns {tensor name: type name}.

  file_type: a FILE_TYPES name, any case; matrices get llama-quantize's mix (`tensor_type`), and
  each one that falls back to another type for its row length raises a TypeFallbackWarning.
  tokenizer: an HFTokenizer or HF tokenizer folder (byte-level BPE), or a CharTokenizer; without
  one the file holds no vocabulary (tokenizer.ggml.model 'none') and llama.cpp cannot tokenize
  text for it.
  arch: 'llama', 'qwen2' or 'qwen3'; None picks qwen3 for q/k norm, qwen2 for qkv bias, else
  llama. tokenizer_pre: llama.cpp pre-tokenizer name; None recognises Llama 3 / Qwen2 split
  regexes and GPT-2's byte-level regex, and otherwise writes 'default'.
  """
  cfg = model.config
  file_type = file_type_key(file_type)
  arch = arch or default_arch(cfg)
  _check_arch(cfg, arch)
  if isinstance(tokenizer, str):
    from distill.data.hf_tokenizer import HFTokenizer
    tokenizer = HFTokenizer(tokenizer)
  tensors = gguf_tensors(nnx.state(model, nnx.Param), cfg, arch)
  if jax.process_index() != 0:
    return {}
  writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCHS[arch]])
  Dh = cfg.resolved_head_dim
  writer.add_name(name)
  writer.add_context_length(cfg.max_seq_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_block_count(cfg.n_layers)
  writer.add_feed_forward_length(cfg.d_ff)
  writer.add_head_count(cfg.n_heads)
  writer.add_head_count_kv(cfg.n_kv_heads)
  writer.add_key_length(Dh)
  writer.add_value_length(Dh)
  writer.add_rope_dimension_count(Dh)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_file_type(FILE_TYPES[file_type][0])
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  if tokenizer is None:
    writer.add_tokenizer_model('none')
  else:
    _tokenizer_metadata(writer, tokenizer, cfg.vocab_size, tokenizer_pre)
  written = {}
  for tensor_name, value in tensors.items():
    qtype, wanted = tensor_type(tensor_name, value.shape, file_type, cfg.n_layers,
                                has_output='output.weight' in tensors)
    if wanted is not None:
      warnings.warn(TypeFallbackWarning(
          f'{tensor_name}: rows of {value.shape[-1]} are not a multiple of '
          f'{gguf_quants.block_size(wanted)} ({wanted.name}); written as {qtype.name}'))
    writer.add_tensor(tensor_name, _encode(value, qtype), raw_dtype=qtype)
    written[tensor_name] = qtype.name
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return written
