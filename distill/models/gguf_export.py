"""GGUF export (llama.cpp) of a Transformer, through the `gguf` package.

What each llama.cpp architecture reads (tensor names and layouts, hyper-parameter keys, which
model options it computes) is distill.models.gguf_arch; this module writes the file:

* Types. 1-D tensors (norms, biases) stay F32. 2-D weights follow llama-quantize's per-tensor mix
  for the file type (`tensor_type`), quantised by distill.models.gguf_quants to the bytes
  llama.cpp's reference quantizer writes.
* The vocabulary: a byte-level BPE tokenizer.json (GPT-2 / Llama 3 / Qwen) is written as
  llama.cpp's 'gpt2' tokenizer: tokens, types, merges, special ids and the chat template, with
  ids the model has beyond the tokenizer written as '[PAD{i}]' (as the converter does). llama.cpp
  does not run tokenizer.json's pre-tokenizer; it picks a built-in one by the name in
  tokenizer.ggml.pre, which is recognised here from the split regex (Llama 3 'llama-bpe',
  Qwen2/2.5/3 'qwen2', plain byte-level 'gpt-2') or given explicitly. A SentencePiece-style BPE
  with byte fallback (Gemma, Llama 2, Phi-3-mini) is written as llama.cpp's 'llama' tokenizer,
  scores ranking merges as tokenizer.json does (`_spm_vocab`). The embedded tasks'
  CharTokenizer is written as 'gpt2', one token per character and no merge that applies
  (`_char_vocab`).
* Lineage: a provenance record (distill.provenance) goes into general.* keys and, whole, into the
  string key `distill.provenance` (JSON).
Run the file with e.g. `llama-cli -m student.gguf -cnv` (the chat template is in the file).
"""
from __future__ import annotations

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
from distill.models import gguf_arch, gguf_quants
# What callers (the convert CLI) name through this module.
from distill.models.gguf_arch import ARCHS, default_arch  # noqa: F401

Q = gguf.GGMLQuantizationType
PROVENANCE_KEY = 'distill.provenance'   # a string key: the provenance record as JSON
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
# llama.cpp pre-tokenizer names of known byte-level BPE split regexes (Llama 3, Qwen2/2.5/3).
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": 'llama-bpe',
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": 'qwen2',
}


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
  * Q4_K_M and Q5_K_M: attn_v (or Phi-3's fused attn_qkv, which llama.cpp counts as attn_v)
    and ffn_down of layer i are Q6_K when i is in the first or last
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
        name.endswith(('.attn_v.weight', '.attn_qkv.weight', '.ffn_down.weight')) and
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
  """A vocabulary as llama.cpp's 'gpt2' (byte-level BPE) or 'llama' (SentencePiece) tokenizer
  reads it."""
  token_by_id: dict[int, str]
  control_ids: set[int]
  user_defined_ids: set[int]
  merges: list[str]             # 'gpt2' only
  pre: str                      # llama.cpp's pre-tokenizer name
  model: str = 'gpt2'
  scores: dict[int, float] | None = None      # 'llama': merge priority (higher first)
  add_space_prefix: bool = False              # 'llama': a '▁' before the text
  unk_id: int | None = None


_BYTE_TOKEN = re.compile(r'<0x[0-9A-Fa-f]{2}>')
_SPM_SPACE = '\u2581'   # '▁', SentencePiece's spelling of a space


def _hf_vocab(tokenizer) -> _Vocab:
  """The vocabulary of an HFTokenizer: byte-level BPE (GPT-2 / Llama 3 / Qwen style) as 'gpt2',
  SentencePiece-style BPE with byte fallback (Gemma, Llama 2, Phi-3-mini) as 'llama'."""
  spec = json.loads(tokenizer.tokenizer.to_str())
  model = spec.get('model') or {}
  decoder = (spec.get('decoder') or {}).get('type')
  if model.get('type') == 'BPE' and model.get('byte_fallback'):
    return _spm_vocab(tokenizer, spec)
  if model.get('type') != 'BPE' or decoder != 'ByteLevel':
    raise ValueError(f'only byte-level BPE tokenizers (GPT-2 / Llama 3 / Qwen style) and '
                     f'SentencePiece-style BPE with byte fallback (Gemma / Llama 2 style) export '
                     f'to GGUF; {tokenizer.folder!r} has model {model.get("type")!r}, decoder '
                     f'{decoder!r}')
  by_id = {i: t for t, i in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items()}
  added = tokenizer.tokenizer.get_added_tokens_decoder()
  control = {i for i, t in added.items() if t.special}
  merges = [m if isinstance(m, str) else ' '.join(m) for m in model.get('merges', [])]
  return _Vocab(by_id, control, set(added) - control, merges,
                _pre_tokenizer_name(spec.get('pre_tokenizer') or {}))


def _spm_vocab(tokenizer, spec: dict) -> _Vocab:
  """A SentencePiece-style BPE tokenizer.json as llama.cpp's 'llama' vocabulary.

  llama.cpp's SentencePiece tokenizer writes spaces as '▁' (with one more before the text when
  add_space_prefix), splits into characters and repeatedly joins the neighbouring pair whose
  join is a token with the highest score, leftmost first; pieces left outside the vocabulary
  become their UTF-8 bytes' <0xNN> tokens. tokenizer.json's BPE joins the pair of lowest merge
  rank, so a token's score is minus the rank of the merge that first makes it (tokens no merge
  makes score below all of them).
  """
  parts = [spec.get('normalizer') or {}, spec.get('pre_tokenizer') or {}]
  parts += [p for part in list(parts) for p in part.get('normalizers', part.get(
      'pretokenizers', []))]
  spaces = any(p.get('type') == 'Metaspace' or (p.get('type') == 'Replace' and p.get(
      'content') == _SPM_SPACE) for p in parts)
  if not spaces:
    raise ValueError(f'{tokenizer.folder!r}: a byte-fallback BPE tokenizer exports as '
                     f"SentencePiece only when it writes spaces as '{_SPM_SPACE}' (a Replace "
                     'normalizer or a Metaspace pre-tokenizer), as llama.cpp does')
  prefix = any((p.get('type') == 'Prepend' and p.get('prepend') == _SPM_SPACE) or (
      p.get('type') == 'Metaspace' and p.get('prepend_scheme', 'always') != 'never'
      and p.get('add_prefix_space', True)) for p in parts)
  by_id = {i: t for t, i in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items()}
  vocab = {t: i for i, t in by_id.items()}
  merges = [m.split(' ') if isinstance(m, str) else m for m in spec['model'].get('merges', [])]
  scores = dict.fromkeys(by_id, -float(len(merges)))
  for rank in range(len(merges) - 1, -1, -1):   # the first merge making a token wins
    joined = ''.join(merges[rank])
    if joined in vocab:
      scores[vocab[joined]] = -float(rank)
  added = tokenizer.tokenizer.get_added_tokens_decoder()
  control = {i for i, t in added.items() if t.special}
  unk = spec['model'].get('unk_token')
  return _Vocab(by_id, control, set(added) - control, [], 'default', 'llama', scores, prefix,
                vocab.get(unk) if unk else None)


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


def _token_type(i: int, vocab: _Vocab) -> gguf.TokenType:
  if i not in vocab.token_by_id:
    return gguf.TokenType.USER_DEFINED
  if vocab.model == 'llama':   # byte and unknown tokens first: llama.cpp decodes them so
    if _BYTE_TOKEN.fullmatch(vocab.token_by_id[i]):
      return gguf.TokenType.BYTE
    if i == vocab.unk_id:
      return gguf.TokenType.UNKNOWN
  if i in vocab.user_defined_ids:
    return gguf.TokenType.USER_DEFINED
  return gguf.TokenType.CONTROL if i in vocab.control_ids else gguf.TokenType.NORMAL


def _vocab(tokenizer) -> _Vocab:
  return _char_vocab(tokenizer) if isinstance(tokenizer, CharTokenizer) else _hf_vocab(tokenizer)


def _token_list(vocab: _Vocab, vocab_size: int) -> list[str]:
  """tokenizer.ggml.tokens: ids past the tokenizer's (a padded embedding) get placeholders."""
  return [vocab.token_by_id.get(i, f'[PAD{i}]') for i in range(vocab_size)]


def token_list(tokenizer, vocab_size: int) -> list[str]:
  """The tokenizer.ggml.tokens an export of a `vocab_size` model with `tokenizer` writes."""
  return _token_list(_vocab(tokenizer), vocab_size)


def _tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre: str | None):
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f'tokenizer has {tokenizer.vocab_size} tokens, the model only {vocab_size}')
  vocab = _vocab(tokenizer)
  writer.add_tokenizer_model(vocab.model)
  writer.add_tokenizer_pre(pre or vocab.pre)
  writer.add_token_list(_token_list(vocab, vocab_size))
  writer.add_token_types([_token_type(i, vocab) for i in range(vocab_size)])
  if vocab.model == 'llama':
    lowest = min(vocab.scores.values(), default=0.0)
    writer.add_token_scores([vocab.scores.get(i, lowest) for i in range(vocab_size)])
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.unk_id is not None:
      writer.add_unk_token_id(vocab.unk_id)
  else:
    writer.add_token_merges(vocab.merges)
  writer.add_bos_token_id(tokenizer.bos_id)
  writer.add_eos_token_id(tokenizer.eos_id)
  writer.add_pad_token_id(tokenizer.pad_id)
  # The batch pipeline puts BOS before every prompt unless the tokenizer says otherwise.
  writer.add_add_bos_token(getattr(tokenizer, 'add_bos', True))
  writer.add_add_eos_token(False)
  if getattr(tokenizer, 'chat_template', None) is not None:
    writer.add_chat_template(tokenizer.chat_template.source)


def _provenance_metadata(writer: gguf.GGUFWriter, record: dict):
  """A distill.provenance record as general.* keys (description = its summary, base models =
  its teachers, datasets = its data sources, tags) and whole as the JSON string PROVENANCE_KEY."""
  writer.add_description(record['summary'])
  teachers = [t for t in [record.get('teacher'), *record.get('more_teachers', ())] if t]
  if teachers:
    writer.add_base_model_count(len(teachers))
    for i, teacher in enumerate(teachers):
      writer.add_base_model_name(i, teacher['name'])
  writer.add_dataset_count(len(record['data']))
  for i, source in enumerate(record['data']):
    writer.add_dataset_name(i, source['task'])
  writer.add_tags(['distill', 'knowledge-distillation'])
  writer.add_string(PROVENANCE_KEY, json.dumps(record, sort_keys=True))


def export_gguf(model, path: str, *, tokenizer=None, file_type: str = 'f16',
                arch: str | None = None, name: str = 'distill-student',
                tokenizer_pre: str | None = None,
                provenance: dict | None = None) -> dict[str, str]:
  """Writes `model` (a Transformer) to the GGUF file `path`; returns {tensor name: type name}.

  file_type: a FILE_TYPES name, any case; matrices get llama-quantize's mix (`tensor_type`), and
  each one that falls back to another type for its row length raises a TypeFallbackWarning.
  tokenizer: an HFTokenizer or HF tokenizer folder (byte-level BPE, or BPE with byte fallback as
  SentencePiece models convert to), or a CharTokenizer; without
  one the file holds no vocabulary (tokenizer.ggml.model 'none') and llama.cpp cannot tokenize
  text for it.
  arch: one of gguf_arch.ARCHS; None picks gemma3 / gemma2 for Gemma models (with / without q/k
  norm), phi3 for partial rotary, qwen3 for q/k norm, qwen2 for qkv bias, else llama. Options the
  architecture's llama.cpp graph does not compute are refused by name (gguf_arch.check).
  tokenizer_pre: llama.cpp pre-tokenizer name; None recognises Llama 3 / Qwen2 split regexes and
  GPT-2's byte-level regex, and otherwise writes 'default'.
  provenance: a distill.provenance record, written as general.* keys and PROVENANCE_KEY.
  """
  cfg = model.config
  file_type = file_type_key(file_type)
  arch = arch or default_arch(cfg)
  gguf_arch.check(cfg, arch)
  if isinstance(tokenizer, str):
    from distill.data.hf_tokenizer import HFTokenizer
    tokenizer = HFTokenizer(tokenizer)
  tensors = gguf_arch.gguf_tensors(nnx.state(model, nnx.Param), cfg, arch)
  if jax.process_index() != 0:
    return {}
  writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCHS[arch]])
  writer.add_name(name)
  if provenance is not None:
    _provenance_metadata(writer, provenance)
  gguf_arch.add_hparams(writer, cfg, arch)
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
