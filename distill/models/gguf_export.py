"""GGUF export (llama.cpp) of a Transformer, through the `gguf` package.

Tensors go through the Hugging Face naming of distill.models.hf and then gguf's own HF -> GGUF
name map (token_embd, blk.N.attn_q, ..., output_norm, output), in HF [out, in] layout, which is
what llama.cpp's convert_hf_to_gguf.py writes. Two conventions follow that converter:

* RoPE layout. HF rotates pairs (i, i + Dh/2) ("rotate_half"). llama.cpp's 'llama' architecture
  uses LLAMA_ROPE_TYPE_NORM, rotating adjacent pairs (2i, 2i+1), so the converter's LlamaModel
  permutes the rows of q_proj and k_proj (weights and biases) within each head,
  reshape(heads, 2, Dh/2, ...).swapaxes(1, 2); the dot products q.k are unchanged. 'qwen2' and
  'qwen3' use LLAMA_ROPE_TYPE_NEOX (rotate_half) and their converter copies q/k as they are.
* Types. 1-D tensors (norms, biases) stay F32; 2-D weights are F32, F16 or Q8_0. Q8_0 needs rows
  that are a multiple of 32; other rows fall back to F16, as llama.cpp does.

The vocabulary is written as llama.cpp's 'gpt2' (byte-level BPE) tokenizer: tokens, types,
merges, special ids and the chat template, with ids the model has beyond the tokenizer written as
'[PAD{i}]' (as the converter does). llama.cpp does not run tokenizer.json's pre-tokenizer; it
picks a built-in one by the name in tokenizer.ggml.pre, which is recognised here from the split
regex (Llama 3 'llama-bpe', Qwen2/2.5/3 'qwen2', plain byte-level 'gpt-2') or given explicitly.
Run the file with e.g. `llama-cli -m student.gguf -cnv` (the chat template is in the file).
"""
from __future__ import annotations

import json

import gguf
import jax
import numpy as np
from flax import nnx

from distill.models import hf
from distill.models.config import ModelConfig

FILE_TYPES = {
    'f32': (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    'f16': (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    'q8_0': (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
ARCHS = {'llama': gguf.MODEL_ARCH.LLAMA, 'qwen2': gguf.MODEL_ARCH.QWEN2,
         'qwen3': gguf.MODEL_ARCH.QWEN3}
# llama.cpp pre-tokenizer names of known byte-level BPE split regexes (Llama 3, Qwen2/2.5/3).
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": 'llama-bpe',
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": 'qwen2',
}


def default_arch(cfg: ModelConfig) -> str:
  return 'qwen3' if cfg.qk_norm else 'qwen2' if cfg.qkv_bias else 'llama'


def _check_arch(cfg: ModelConfig, arch: str):
  if arch not in ARCHS:
    raise ValueError(f'GGUF architecture must be one of {list(ARCHS)}, got {arch!r}')
  if cfg.qk_norm != (arch == 'qwen3'):
    raise ValueError(f'GGUF architecture {arch!r} does not match the model: qk_norm={cfg.qk_norm} '
                     "(q/k-norm models are 'qwen3', and only they)")
  if cfg.qkv_bias and arch == 'qwen3':
    raise ValueError("llama.cpp's 'qwen3' has no q/k/v biases")


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
  for name, value in tensors.items():
    value = value.astype(np.float32)
    if arch == 'llama':
      if '.q_proj.' in name:
        value = permute_for_norm_rope(value, cfg.n_heads)
      elif '.k_proj.' in name:
        value = permute_for_norm_rope(value, cfg.n_kv_heads)
    out[name_map.get_name(name, try_suffixes=('.weight', '.bias'))] = value
  return out


def _encode(value: np.ndarray, qtype) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
  """(data, type) of one tensor under the requested 2-D type."""
  if value.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
    return value, gguf.GGMLQuantizationType.F32
  if qtype == gguf.GGMLQuantizationType.Q8_0 and value.shape[-1] % 32 == 0:
    return gguf.quants.quantize(value, qtype), qtype
  return value.astype(np.float16), gguf.GGMLQuantizationType.F16


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


def _tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre: str | None):
  spec = json.loads(tokenizer.tokenizer.to_str())
  model = spec.get('model') or {}
  if model.get('type') != 'BPE' or model.get('byte_fallback') or \
      (spec.get('decoder') or {}).get('type') != 'ByteLevel':
    raise ValueError(f'only byte-level BPE tokenizers (GPT-2 / Llama 3 / Qwen style) export to '
                     f'GGUF; {tokenizer.folder!r} has model {model.get("type")!r}, decoder '
                     f'{(spec.get("decoder") or {}).get("type")!r}')
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f'tokenizer has {tokenizer.vocab_size} tokens, the model only {vocab_size}')
  by_id = {i: t for t, i in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items()}
  added = tokenizer.tokenizer.get_added_tokens_decoder()
  tokens, types = [], []
  for i in range(vocab_size):
    if i not in by_id:
      tokens.append(f'[PAD{i}]')
      types.append(gguf.TokenType.USER_DEFINED)
    else:
      tokens.append(by_id[i])
      types.append(gguf.TokenType.NORMAL if i not in added else
                   gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
  merges = [m if isinstance(m, str) else ' '.join(m) for m in model.get('merges', [])]
  pre = pre or _pre_tokenizer_name(spec.get('pre_tokenizer') or {})
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(tokenizer.bos_id)
  writer.add_eos_token_id(tokenizer.eos_id)
  writer.add_pad_token_id(tokenizer.pad_id)
  writer.add_add_bos_token(tokenizer.add_bos)
  writer.add_add_eos_token(False)
  if tokenizer.chat_template is not None:
    writer.add_chat_template(tokenizer.chat_template.source)


def export_gguf(model, path: str, *, tokenizer=None, file_type: str = 'f16',
                arch: str | None = None, name: str = 'distill-student',
                tokenizer_pre: str | None = None) -> dict[str, str]:
  """Writes `model` (a Transformer) to the GGUF file `path`; returns {tensor name: type name}.

  tokenizer: an HFTokenizer or HF tokenizer folder (byte-level BPE); without one the file holds
  no vocabulary (tokenizer.ggml.model 'none') and llama.cpp cannot tokenize text for it.
  arch: 'llama', 'qwen2' or 'qwen3'; None picks qwen3 for q/k norm, qwen2 for qkv bias, else
  llama. tokenizer_pre: llama.cpp pre-tokenizer name; None recognises Llama 3 / Qwen2 split
  regexes and GPT-2's byte-level regex, and otherwise writes 'default'.
  """
  cfg = model.config
  if file_type not in FILE_TYPES:
    raise ValueError(f'file_type must be one of {list(FILE_TYPES)}, got {file_type!r}')
  arch = arch or default_arch(cfg)
  _check_arch(cfg, arch)
  if tokenizer is not None:
    from distill.data.hf_tokenizer import HFTokenizer
    tokenizer = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer(tokenizer)
  ftype, qtype = FILE_TYPES[file_type]
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
  writer.add_file_type(ftype)
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  if tokenizer is None:
    writer.add_tokenizer_model('none')
  else:
    _tokenizer_metadata(writer, tokenizer, cfg.vocab_size, tokenizer_pre)
  written = {}
  for tensor_name, value in tensors.items():
    data, dtype = _encode(value, qtype)
    writer.add_tensor(tensor_name, data, raw_dtype=dtype)
    written[tensor_name] = dtype.name
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return written
