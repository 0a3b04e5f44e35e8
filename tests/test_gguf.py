"""GGUF export read back with gguf.GGUFReader: names, shapes, types, metadata, the quantizers
(bit-for-bit against gguf's and pinned to llama.cpp's bytes, error bounds through gguf's
dequantizer), llama-quantize's type mix, the CharTokenizer vocabulary, and a numpy forward pass
with llama.cpp's conventions that must reproduce transformers' logits."""
import ctypes
import dataclasses
import hashlib
import json
import os
import warnings

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import distill  # noqa: F401  (flax config)
from distill import convert
from distill.data.hf_tokenizer import HFTokenizer
from distill.data.tokenizer import CharTokenizer
from distill.models import ModelConfig, get_preset, load_hf
from distill.models import gguf_arch, gguf_export, gguf_quants, hf
from distill.parallel import mesh as mesh_lib
from distill.models import sharded
from distill.train import teacher

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')
Q = gguf.GGMLQuantizationType
LAYER_TENSORS = ('attn_norm', 'attn_q', 'attn_k', 'attn_v', 'attn_output', 'ffn_norm', 'ffn_gate',
                 'ffn_up', 'ffn_down')


def fixture(name):
  return os.path.join(FIXTURES, name)


def load(name):
  return load_hf(fixture(name), mesh=mesh_lib.make_mesh({'data': 1}))


def field(reader, key):
  return reader.fields[key].contents()


def tensors(reader):
  return {t.name: t for t in reader.tensors}


def random_model(cfg):
  graphdef, abstract = sharded.abstract_model(cfg)
  rng = np.random.default_rng(0)   # numpy weights: no eager random-init compilation
  return nnx.merge(graphdef, jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), abstract))


@pytest.fixture(scope='module')
def llama_gqa():
  return load('llama_gqa')


@pytest.mark.parametrize('file_type,qtype,ftype', [('f32', Q.F32, 0), ('f16', Q.F16, 1),
                                                   ('q8_0', Q.Q8_0, 7)])
def test_names_shapes_types_and_metadata(llama_gqa, tmp_path, file_type, qtype, ftype):
  path = str(tmp_path / 'm.gguf')
  gguf_export.export_gguf(llama_gqa, path, tokenizer=fixture('llama_gqa'), file_type=file_type)
  reader = gguf.GGUFReader(path)
  got = tensors(reader)
  want = {'token_embd.weight', 'output_norm.weight', 'output.weight'} | {
      f'blk.{l}.{t}.weight' for l in range(2) for t in LAYER_TENSORS}
  assert set(got) == want
  # GGUF lists dims innermost first: [in, out] for HF's [out, in].
  assert list(got['token_embd.weight'].shape) == [32, 150]
  assert list(got['blk.1.attn_k.weight'].shape) == [32, 16]    # 2 kv heads x 8
  assert list(got['blk.0.ffn_down.weight'].shape) == [64, 32]
  for name, t in got.items():
    assert t.tensor_type == (Q.F32 if name.endswith('norm.weight') else qtype), name
  assert field(reader, 'general.architecture') == 'llama'
  assert field(reader, 'general.file_type') == ftype
  expected = {'context_length': 64, 'embedding_length': 32, 'block_count': 2,
              'feed_forward_length': 64, 'attention.head_count': 4, 'attention.head_count_kv': 2,
              'rope.dimension_count': 8, 'vocab_size': 150}
  for key, value in expected.items():
    assert field(reader, f'llama.{key}') == value, key
  assert field(reader, 'llama.rope.freq_base') == 500_000.0
  assert np.isclose(field(reader, 'llama.attention.layer_norm_rms_epsilon'), 1e-6)
  # Tokenizer: the vocabulary in id order, merges and special ids from tokenizer.json.
  spec = json.load(open(os.path.join(fixture('llama_gqa'), 'tokenizer.json')))
  vocab = {i: t for t, i in Tokenizer.from_file(
      os.path.join(fixture('llama_gqa'), 'tokenizer.json')).get_vocab(True).items()}
  assert field(reader, 'tokenizer.ggml.model') == 'gpt2'
  assert field(reader, 'tokenizer.ggml.pre') == 'gpt-2'   # ByteLevel's own GPT-2 split regex
  assert field(reader, 'tokenizer.ggml.tokens') == [vocab[i] for i in range(150)]
  assert field(reader, 'tokenizer.ggml.merges') == [' '.join(m) for m in spec['model']['merges']]
  types = field(reader, 'tokenizer.ggml.token_type')
  assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
  assert (field(reader, 'tokenizer.ggml.bos_token_id'), field(reader, 'tokenizer.ggml.eos_token_id'),
          field(reader, 'tokenizer.ggml.add_bos_token')) == (0, 2, True)
  template = open(os.path.join(fixture('llama_gqa'), 'chat_template.jinja')).read()
  assert field(reader, 'tokenizer.chat_template') == template


def test_q8_0_dequantises_close_to_the_weights(llama_gqa, tmp_path):
  exact_path, q8_path = str(tmp_path / 'f32.gguf'), str(tmp_path / 'q8.gguf')
  gguf_export.export_gguf(llama_gqa, exact_path, file_type='f32')
  gguf_export.export_gguf(llama_gqa, q8_path, file_type='q8_0')
  exact, q8 = tensors(gguf.GGUFReader(exact_path)), tensors(gguf.GGUFReader(q8_path))
  quantised = [name for name, t in q8.items() if t.tensor_type == Q.Q8_0]
  assert quantised   # else the loop below checks nothing
  for name, t in q8.items():
    if t.tensor_type != Q.Q8_0:
      continue
    w = np.asarray(exact[name].data)
    deq = gguf.quants.dequantize(np.asarray(t.data), Q.Q8_0).reshape(w.shape)
    # Half an int8 step of the block scale d = amax / 127, plus d rounded to float16 (2^-11).
    blocks = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(deq - w).reshape(-1, 32) <= blocks * (0.5 + 127 * 2.0**-11) + 1e-7), name


def test_q8_0_falls_back_to_f16_for_rows_not_multiple_of_32(tmp_path):
  model = random_model(ModelConfig(vocab_size=64, d_model=48, n_layers=1, n_heads=2,
                                   n_kv_heads=2, d_ff=64))
  with pytest.warns(gguf_export.TypeFallbackWarning) as caught:
    written = gguf_export.export_gguf(model, str(tmp_path / 'm.gguf'), file_type='q8_0')
  assert written['blk.0.attn_q.weight'] == 'F16'     # rows of d_model=48
  assert written['blk.0.ffn_down.weight'] == 'Q8_0'  # rows of d_ff=64
  assert ('blk.0.attn_q.weight: rows of 48 are not a multiple of 32 (Q8_0); written as F16'
          in [str(w.message) for w in caught])
  assert len(caught) == sum(t == 'F16' for t in written.values())
  reader = gguf.GGUFReader(str(tmp_path / 'm.gguf'))
  assert field(reader, 'tokenizer.ggml.model') == 'none'


# ---- quantizers ----------------------------------------------------------------------------------

BLOCK_BOUND = {Q.Q4_K: 1 / 8, Q.Q5_K: 1 / 16, Q.Q6_K: 1 / 40}   # K-quant error / block's max |x|


def awkward_rows(seed):
  """[rows, 512] float32 inputs by name: random, and the cases quantizers get wrong."""
  rng = np.random.default_rng(seed)
  normal = rng.normal(size=(6, 512)).astype(np.float32)
  outliers = normal.copy()
  outliers.reshape(-1)[rng.choice(outliers.size, 5, replace=False)] *= 1e4
  return {'normal': normal,
          'heavy_tailed': rng.standard_t(2, size=(6, 512)).astype(np.float32),
          'zeros': np.zeros((6, 512), np.float32),
          'constant_rows': np.repeat(rng.normal(size=(6, 1)).astype(np.float32) * 10, 512, 1),
          'outliers_x1e4': outliers,
          'negative_only': -np.abs(normal),
          'positive_offset': np.abs(normal) + 5,
          'sparse': np.where(rng.random((6, 512)) < 0.95, 0, normal).astype(np.float32)}


def integer_rows_8x512():
  """Inputs built with exact float32 arithmetic only (no libm), so their bytes are the same on
  every machine: hashed integers / 4096, then negative-only, zero, constant, outlier, tiny and
  integer-valued (tie-rounding) rows."""
  i = np.arange(8 * 512, dtype=np.int64)
  x = (((i * 2654435761) % 65521 - 32760) / 4096).astype(np.float32).reshape(8, 512)
  x[1] = -np.abs(x[1])
  x[2] = 0
  x[3] = x[3, 0]
  x[4, ::97] *= 1024
  x[5] *= np.float32(2.0**-20)
  x[6] = np.round(x[6])
  return x


# sha256 prefixes of llama.cpp's own bytes for integer_rows_8x512(), from ggml_quantize_chunk of
# llama-cpp-python 0.3.36's libggml-base (experiments/gguf_quant_parity); ours must equal them.
LLAMA_CPP_SHA256 = {Q.Q8_0: 'b4d08da85a693d63', Q.Q4_0: '21c85a12b6b19b9b',
                    Q.Q4_K: '1fd83323a78d07f9', Q.Q5_K: '3fdc823f3c9fb4be',
                    Q.Q6_K: 'add0d61fc8f836b1'}


@pytest.mark.parametrize('qtype', [Q.Q8_0, Q.Q4_0])
@pytest.mark.parametrize('seed', range(3))
def test_q8_0_q4_0_equal_gguf_bit_for_bit(qtype, seed):
  for name, x in awkward_rows(seed).items():
    np.testing.assert_array_equal(gguf_quants.quantize(x, qtype), gguf.quants.quantize(x, qtype),
                                  err_msg=name)


@pytest.mark.parametrize('qtype', list(LLAMA_CPP_SHA256))
def test_quantizers_write_llama_cpp_bytes(qtype):
  got = gguf_quants.quantize(integer_rows_8x512(), qtype)
  assert hashlib.sha256(got.tobytes()).hexdigest()[:16] == LLAMA_CPP_SHA256[qtype]


@pytest.mark.parametrize('qtype', list(LLAMA_CPP_SHA256))
def test_quantizers_equal_installed_llama_cpp(qtype):
  """Same bytes as the llama.cpp of llama-cpp-python (optional), on random and awkward rows."""
  llama_cpp = pytest.importorskip('llama_cpp')
  lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib', 'libggml-base.so'))
  lib.ggml_quantize_chunk.restype = ctypes.c_size_t
  lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_void_p]
  for name, x in awkward_rows(0).items():
    want = np.zeros_like(gguf_quants.quantize(x, qtype))
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, want.ctypes.data, 0, *x.shape, None)
    np.testing.assert_array_equal(gguf_quants.quantize(x, qtype), want, err_msg=name)


@pytest.mark.parametrize('qtype', list(LLAMA_CPP_SHA256))
def test_quantisation_error_within_llama_cpp_threshold(qtype):
  """llama.cpp's test-quantize-fns: 4096 values 0.1 + 2 cos(i), sqrt(sum err^2) / n < 0.002."""
  x = (0.1 + 2 * np.cos(np.arange(4096))).astype(np.float32)[None]
  err = gguf.quants.dequantize(gguf_quants.quantize(x, qtype), qtype) - x
  assert np.sqrt(np.sum(err.astype(np.float64) ** 2)) / x.size < 0.002


@pytest.mark.parametrize('qtype', list(BLOCK_BOUND))
@pytest.mark.parametrize('seed', range(3))
def test_k_quants_round_trip_on_awkward_rows(qtype, seed):
  """Through gguf's dequantizer: zeros stay exact zeros, a constant row comes back to fp16
  precision, and no value is further from its input than a fraction of its block's largest
  |value| (half a level step of the sub-block's range, plus its 6/8-bit scale's rounding)."""
  for name, x in awkward_rows(seed).items():
    back = gguf.quants.dequantize(gguf_quants.quantize(x, qtype), qtype)
    assert np.isfinite(back).all(), name
    if name == 'zeros':
      assert not back.any()
    if name == 'constant_rows':
      np.testing.assert_allclose(back, x, rtol=2.0**-10)
    err_Nx256 = np.abs(back - x).reshape(-1, 256)
    amax_Nx1 = np.abs(x).reshape(-1, 256).max(1, keepdims=True)
    assert (err_Nx256 <= BLOCK_BOUND[qtype] * amax_Nx1).all(), name


def test_quantize_rejects_rows_not_multiple_of_the_block():
  with pytest.raises(ValueError, match='Q4_K needs rows that are a multiple of 256, got 320'):
    gguf_quants.quantize(np.zeros((2, 320), np.float32), Q.Q4_K)


# ---- llama-quantize's type mix -------------------------------------------------------------------

def mix(file_type, n_layers, names, has_output=True, cols=256):
  return {n: gguf_export.tensor_type(n, (64, cols), file_type, n_layers, has_output)[0].name
          for n in names}


def test_use_more_bits_layers():
  """First and last eighth, and every third layer from n/8 + 2 (llama.cpp's use_more_bits)."""
  more = lambda n: {i for i in range(n) if gguf_export._use_more_bits(i, n)}  # noqa: E731
  assert more(8) == {0, 3, 6, 7}
  assert more(32) == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
  assert more(2) == {1}    # n/8 = 0: only the "last eighth", layers >= 7*2/8 = 1
  assert more(1) == {0}


@pytest.mark.parametrize('file_type,base', [('q4_k_m', 'Q4_K'), ('q5_k_m', 'Q5_K')])
def test_k_m_mix(file_type, base):
  names = [f'blk.{l}.{t}.weight' for l in range(8) for t in LAYER_TENSORS if 'norm' not in t]
  got = mix(file_type, 8, names + ['output.weight', 'token_embd.weight'])
  for name, qtype in got.items():
    layer = int(name.split('.')[1]) if name.startswith('blk.') else None
    more_bits = layer in (0, 3, 6, 7) and name.endswith(('attn_v.weight', 'ffn_down.weight'))
    want = 'Q6_K' if more_bits or name == 'output.weight' else base
    assert qtype == want, name
  # Tied embeddings: token_embd is the output matrix and gets its type.
  assert mix(file_type, 8, ['token_embd.weight'], has_output=False) == {'token_embd.weight': 'Q6_K'}


def test_plain_types_mix():
  names = ['blk.0.attn_v.weight', 'blk.0.ffn_down.weight', 'token_embd.weight', 'output.weight']
  assert set(mix('q6_k', 8, names).values()) == {'Q6_K'}
  assert set(mix('q8_0', 8, names).values()) == {'Q8_0'}
  assert set(mix('f16', 8, names).values()) == {'F16'}
  assert mix('q4_0', 8, names) == {**dict.fromkeys(names, 'Q4_0'), 'output.weight': 'Q6_K'}
  # Output rows that do not fit the file type's block: Q8_0, as a rule rather than a fallback.
  assert gguf_export.tensor_type('output.weight', (64, 96), 'q4_k_m', 8, True) == (Q.Q8_0, None)
  for file_type in gguf_export.FILE_TYPES:
    assert gguf_export.tensor_type('blk.0.attn_norm.weight', (64,), file_type, 8, True) == (
        Q.F32, None)


def test_fallbacks_for_rows_that_do_not_fit():
  fallback = lambda t, cols: gguf_export.tensor_type(  # noqa: E731
      'blk.1.attn_q.weight', (64, cols), t, 8, True)
  assert fallback('q4_k_m', 64) == (Q.Q5_0, Q.Q4_K)
  assert fallback('q5_k_m', 64) == (Q.Q5_1, Q.Q5_K)
  assert fallback('q6_k', 64) == (Q.Q8_0, Q.Q6_K)
  assert fallback('q4_k_m', 48) == (Q.F16, Q.Q4_K)
  assert fallback('q4_0', 48) == (Q.F16, Q.Q4_0)


def test_q4_k_m_export_types_and_values(tmp_path):
  """An 8-layer model with 256-wide rows: the file holds the mix, and each matrix dequantises
  close to the f32 export's."""
  cfg = ModelConfig(vocab_size=32, d_model=256, n_layers=8, n_heads=2, n_kv_heads=1, d_ff=256)
  model = random_model(cfg)
  exact_path, q_path = str(tmp_path / 'f32.gguf'), str(tmp_path / 'q.gguf')
  gguf_export.export_gguf(model, exact_path, file_type='f32')
  written = gguf_export.export_gguf(model, q_path, file_type='Q4_K_M')
  exact, got = tensors(gguf.GGUFReader(exact_path)), tensors(gguf.GGUFReader(q_path))
  assert field(gguf.GGUFReader(q_path), 'general.file_type') == gguf.LlamaFileType.MOSTLY_Q4_K_M
  assert {n: t.tensor_type.name for n, t in got.items()} == written
  for name, t in got.items():
    assert written[name] == (mix('q4_k_m', 8, [name])[name] if len(t.shape) > 1 else 'F32')
    w = np.asarray(exact[name].data)
    back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
    if t.tensor_type in BLOCK_BOUND:
      amax = np.abs(w).reshape(-1, 256).max(1, keepdims=True)
      assert (np.abs(back - w).reshape(-1, 256) <= BLOCK_BOUND[t.tensor_type] * amax).all(), name
  assert written['blk.3.attn_v.weight'] == 'Q6_K' and written['blk.4.attn_v.weight'] == 'Q4_K'


def test_fallback_warnings_name_tensor_and_types(tmp_path):
  """The quickstart student's widths (rows of 64 and 192) at q4_k_m: every K-quant falls back."""
  model = random_model(ModelConfig(vocab_size=46, d_model=64, n_layers=1, n_heads=4,
                                   n_kv_heads=4, d_ff=192))
  with pytest.warns(gguf_export.TypeFallbackWarning) as caught:
    written = gguf_export.export_gguf(model, str(tmp_path / 'm.gguf'), file_type='q4_k_m')
  messages = {str(w.message) for w in caught}
  assert 'blk.0.attn_q.weight: rows of 64 are not a multiple of 256 (Q4_K); written as Q5_0' \
      in messages
  assert 'blk.0.ffn_down.weight: rows of 192 are not a multiple of 256 (Q6_K); written as Q8_0' \
      in messages
  assert written['output.weight'] == 'Q8_0'   # the output rule, not a fallback: no warning
  assert len(messages) == len([n for n, t in written.items() if t in ('Q5_0', 'Q8_0')]) - 1


# ---- the embedded tasks' CharTokenizer ----------------------------------------------------------

def finished_run(folder, cfg):
  """A workdir as a run on the embedded tasks leaves it: model.json + params/ + config.json."""
  teacher.export_final(str(folder), cfg, nnx.state(random_model(cfg), nnx.Param))
  (folder / 'config.json').write_text(json.dumps({'tokenizer': ''}))
  return str(folder)


def test_quickstart_student_converts_with_its_char_tokenizer(tmp_path, capsys):
  tok = CharTokenizer()
  cfg = get_preset('student-100k', vocab_size=tok.vocab_size)
  out = str(tmp_path / 'student.gguf')
  src = finished_run(tmp_path / 'run', cfg)
  assert convert.main(['to-gguf', '--src', src, '--out', out, '--type', 'q4_k_m']) == 0
  assert 'warning: blk.0.attn_q.weight: rows of 64 are not a multiple of 256 (Q4_K); written ' \
      'as Q5_0' in capsys.readouterr().err
  reader = gguf.GGUFReader(out)
  assert (field(reader, 'tokenizer.ggml.model'), field(reader, 'tokenizer.ggml.pre')) == (
      'gpt2', 'default')
  tokens = field(reader, 'tokenizer.ggml.tokens')
  assert tokens[:3] == ['<pad>', '<bos>', '<eos>'] and len(tokens) == tok.vocab_size
  # Spelled in GPT-2's byte-level alphabet: decoding each token gives back its character.
  assert [decoders.ByteLevel().decode([t]) for t in tokens[3:]] == list(tok.chars)
  assert tokens[tok.token_id(' ')] == 'Ġ'
  types = field(reader, 'tokenizer.ggml.token_type')
  assert types == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * len(tok.chars)
  assert field(reader, 'tokenizer.ggml.merges') == ['<pad> <eos>']   # never applies
  assert [field(reader, f'tokenizer.ggml.{k}') for k in (
      'bos_token_id', 'eos_token_id', 'padding_token_id', 'add_bos_token')] == [1, 2, 0, True]
  for name, t in tensors(reader).items():
    assert t.tensor_type == gguf_export.tensor_type(
        name, tuple(reversed(t.shape.tolist())), 'q4_k_m', cfg.n_layers, True)[0], name


def test_cli_tokenizer_choice_and_unknown_type(tmp_path, capsys):
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
  src, out = finished_run(tmp_path / 'run', cfg), str(tmp_path / 'm.gguf')
  assert convert.main(['to-gguf', '--src', src, '--out', out, '--type', 'bogus']) == 1
  assert "unknown GGUF file type 'bogus'; known: f32, f16" in capsys.readouterr().err
  # A model vocabulary larger than the tokenizer's: the extra ids are '[PAD{i}]'.
  assert convert.main(['to-gguf', '--src', src, '--out', out, '--tokenizer', 'char']) == 0
  tokens = field(gguf.GGUFReader(out), 'tokenizer.ggml.tokens')
  assert tokens[45] == 'z' and tokens[46:] == [f'[PAD{i}]' for i in range(46, 64)]
  # A run on an HF tokenizer names its folder in config.json.
  (tmp_path / 'run' / 'config.json').write_text(json.dumps({'tokenizer': fixture('llama_gqa')}))
  assert convert.main(['to-gguf', '--src', src, '--out', out]) == 1
  assert 'tokenizer has 150 tokens, the model only 64' in capsys.readouterr().err


def test_llama_cpp_runs_the_char_tokenizer_export(tmp_path):
  """llama.cpp (llama-cpp-python, optional) tokenizes as CharTokenizer and greedily generates
  what the model itself would, from the f32 file; the q4_k_m file loads and generates."""
  llama_cpp = pytest.importorskip('llama_cpp')
  tok = CharTokenizer()
  cfg = get_preset('student-100k', vocab_size=tok.vocab_size)
  model = random_model(cfg)
  prompt = '12+34='
  ids = [tok.bos_id] + tok.encode(prompt)
  for _ in range(8):   # the model's own greedy continuation
    ids.append(int(np.argmax(np.asarray(model(jnp.asarray([ids])))[0, -1])))
  for file_type in ('f32', 'q4_k_m'):
    path = str(tmp_path / f'{file_type}.gguf')
    gguf_export.export_gguf(model, path, tokenizer=tok, file_type=file_type)
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, verbose=False,
                          type_k=0, type_v=0)
    assert llm.tokenize(prompt.encode(), add_bos=True) == ids[:len(prompt) + 1]
    got = llm.create_completion(prompt, max_tokens=8, temperature=0.0)['choices'][0]['text']
    if file_type == 'f32':
      assert got == tok.decode(ids[len(prompt) + 1:])
    else:
      assert set(got) <= set(tok.chars)


# ---- llama.cpp conventions, in numpy -------------------------------------------------------------

def rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x_BxTxHxD, freq, adjacent, mscale=1.0):
  """llama.cpp RoPE of the first 2 * len(freq) dims of each head (the rest pass through): NORM
  rotates pairs (2i, 2i+1), NEOX pairs (i, i + R/2); cos and sin times mscale (YaRN)."""
  R = 2 * len(freq)
  angle = np.arange(x_BxTxHxD.shape[1])[:, None] * freq
  cos, sin = (mscale * np.cos(angle)[None, :, None], mscale * np.sin(angle)[None, :, None])
  x, rest = x_BxTxHxD[..., :R], x_BxTxHxD[..., R:]
  if adjacent:
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(x.shape)
  else:
    a, b = x[..., :R // 2], x[..., R // 2:]
    out = np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
  return np.concatenate([out, rest], -1)


def rope_frequencies(meta, W, swa, scaled):
  """(frequencies, mscale) llama.cpp rotates a layer with: base theta^(-2i/R) (a sliding layer's
  own base when the file has one), divided by rope_freqs; linear scaling divides by the factor;
  YaRN blends the divided and the plain ones over ggml's ramp (beta_fast 32, beta_slow 1) and
  scales cos and sin. scaled=False: no scaling (Gemma 3's sliding layers)."""
  R = meta('rope.dimension_count')
  theta = (meta('rope.freq_base_swa') if swa else None) or meta('rope.freq_base')
  freq = theta ** (-np.arange(0, R, 2) / R)
  if 'rope_freqs.weight' in W:
    freq = freq / W['rope_freqs.weight']
  kind = meta('rope.scaling.type') if scaled else None
  if kind == 'linear':
    return freq / meta('rope.scaling.factor'), 1.0
  if kind != 'yarn':
    return freq, 1.0
  factor, old = meta('rope.scaling.factor'), meta('rope.scaling.original_context_length')
  dim_of = lambda turns: R * np.log(old / (turns * 2 * np.pi)) / (2 * np.log(theta))  # noqa: E731
  low, high = max(0, np.floor(dim_of(32))), min(R - 1, np.ceil(dim_of(1)))
  extrapolate = 1 - np.clip((np.arange(R // 2) - low) / max(0.001, high - low), 0, 1)
  mscale = (meta('rope.scaling.attn_factor') or 1.0) * (1 + 0.1 * np.log(factor))
  return freq / factor * (1 - extrapolate) + freq * extrapolate, mscale


def softcap(x, cap):
  return cap * np.tanh(x / cap) if cap else x


def gguf_forward(path, tokens_BxT):
  """Logits of an f32 GGUF file computed the way llama.cpp's graphs for llama, qwen2, qwen3,
  gemma2, gemma3 and phi3 read it."""
  reader = gguf.GGUFReader(path)
  arch = field(reader, 'general.architecture')
  def meta(key):   # None when the file does not have the key
    return field(reader, f'{arch}.{key}') if f'{arch}.{key}' in reader.fields else None
  W = {n: np.asarray(t.data, np.float64) for n, t in tensors(reader).items()}
  H, K = meta('attention.head_count'), meta('attention.head_count_kv')
  Dh = meta('attention.key_length')
  eps, gemma = meta('attention.layer_norm_rms_epsilon'), arch.startswith('gemma')
  adjacent = arch == 'llama'   # llama.cpp: LLAMA_ROPE_TYPE_NORM; the others: NEOX
  B, T = tokens_BxT.shape
  x = W['token_embd.weight'][tokens_BxT] * (np.sqrt(meta('embedding_length')) if gemma else 1.0)
  distance = np.arange(T)[:, None] - np.arange(T)[None, :]
  # llama.cpp's phi3 ignores sliding windows; Gemma reads them per layer.
  pattern = meta('attention.sliding_window_pattern') if gemma else None
  for l in range(meta('block_count')):
    p = lambda n: W.get(f'blk.{l}.{n}')  # noqa: E731
    h = rms(x, p('attn_norm.weight'), eps)
    if p('attn_qkv.weight') is not None:   # phi3: q, k, v rows fused
      q, k, v = np.split(h @ p('attn_qkv.weight').T, [H * Dh, (H + K) * Dh], axis=-1)
    else:
      q, k, v = (h @ p(f'attn_{n}.weight').T + (p(f'attn_{n}.bias') if p(f'attn_{n}.bias')
                                                is not None else 0) for n in 'qkv')
    q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh), v.reshape(B, T, K, Dh)
    if p('attn_q_norm.weight') is not None:
      q, k = rms(q, p('attn_q_norm.weight'), eps), rms(k, p('attn_k_norm.weight'), eps)
    swa = bool(pattern and pattern[l])
    freq, mscale = rope_frequencies(meta, W, swa, scaled=not (swa and arch == 'gemma3'))
    q, k = rope(q, freq, adjacent, mscale), rope(k, freq, adjacent, mscale)
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    scores = softcap(np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(Dh),
                     meta('attn_logit_softcapping'))
    visible = (distance >= 0) & ((distance < meta('attention.sliding_window')) if swa else True)
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum('bhts,bshd->bthd', probs, v).reshape(B, T, H * Dh) @ p('attn_output.weight').T
    if p('attn_output.bias') is not None:
      attn = attn + p('attn_output.bias')
    if gemma:
      attn = rms(attn, p('post_attention_norm.weight'), eps)
    x = x + attn
    h = rms(x, p('ffn_norm.weight'), eps)
    if p('ffn_gate.weight') is None:   # phi3: gate and up rows fused in ffn_up
      gate, up = np.split(h @ p('ffn_up.weight').T, 2, axis=-1)
    else:
      gate, up = h @ p('ffn_gate.weight').T, h @ p('ffn_up.weight').T
    act = (0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
           if gemma else gate / (1 + np.exp(-gate)))
    ffn = (act * up) @ p('ffn_down.weight').T
    x = x + (rms(ffn, p('post_ffw_norm.weight'), eps) if gemma else ffn)
  out = W.get('output.weight', W['token_embd.weight'])   # tied: llama.cpp reuses token_embd
  return softcap(rms(x, W['output_norm.weight'], eps) @ out.T, meta('final_logit_softcapping'))


@pytest.mark.parametrize('name,arch', [('llama_gqa', 'llama'), ('qwen2', 'qwen2'),
                                       ('qwen3', 'qwen3'), ('mistral', 'llama'),
                                       ('llama32', 'llama'), ('llama_yarn', 'llama'),
                                       ('gemma2', 'gemma2'), ('gemma3', 'gemma3')])
def test_llama_cpp_conventions_reproduce_transformers_logits(name, arch, tmp_path):
  path = str(tmp_path / 'm.gguf')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')   # gemma2's query scale folded in: tested above
    gguf_export.export_gguf(load(name), path, tokenizer=fixture(name), file_type='f32')
  assert field(gguf.GGUFReader(path), 'general.architecture') == arch
  ref = np.load(os.path.join(fixture(name), 'reference.npz'))
  np.testing.assert_allclose(gguf_forward(path, ref['tokens']), ref['logits'], atol=1e-4, rtol=0)


def test_llama_cpp_conventions_phi3_without_its_window(tmp_path):
  """llama.cpp's phi3 attends to every earlier token: transformers' logits where the window
  (5) hides nothing, different ones where it does."""
  path = str(tmp_path / 'm.gguf')
  with pytest.warns(UserWarning, match='phi3 ignores the sliding window'):
    gguf_export.export_gguf(load('phi3'), path, file_type='f32')
  ref = np.load(os.path.join(fixture('phi3'), 'reference.npz'))
  got = gguf_forward(path, ref['tokens'])
  np.testing.assert_allclose(got[:, :5], ref['logits'][:, :5], atol=1e-4, rtol=0)
  assert np.abs(got[:, 5:] - ref['logits'][:, 5:]).max() > 1e-2


@pytest.mark.parametrize('name', ['llama_gqa', 'qwen2', 'qwen3', 'padded_vocab', 'llama32'])
def test_llama_cpp_runs_the_export(name, tmp_path):
  """The real llama.cpp (llama-cpp-python, optional) reads the file: same logits, same tokens."""
  llama_cpp = pytest.importorskip('llama_cpp')
  path = str(tmp_path / 'm.gguf')
  gguf_export.export_gguf(load(name), path, tokenizer=fixture(name), file_type='f32')
  # fp32 KV cache: llama.cpp's default f16 cache alone moves logits by ~1e-3.
  llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, n_threads=1, verbose=False,
                        type_k=0, type_v=0)
  ref = np.load(os.path.join(fixture(name), 'reference.npz'))
  for tokens_T, want_TxV in zip(ref['tokens'], ref['logits']):
    llm.reset()
    llm.eval(tokens_T.tolist())
    np.testing.assert_allclose(np.asarray(llm.scores[:len(tokens_T)]), want_TxV, atol=1e-4, rtol=0)
  tokenizer = HFTokenizer(fixture(name))
  for text in ('hello world', 'The cat sat on the mat, 123!', '<|im_start|>user\nhi<|im_end|>'):
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)


@pytest.mark.parametrize('file_type,tolerance', [('f16', 0.01), ('q8_0', 0.1)])
def test_llama_cpp_runs_quantised_exports(llama_gqa, tmp_path, file_type, tolerance):
  llama_cpp = pytest.importorskip('llama_cpp')
  path = str(tmp_path / 'm.gguf')
  gguf_export.export_gguf(llama_gqa, path, tokenizer=fixture('llama_gqa'), file_type=file_type)
  llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, n_threads=1, verbose=False,
                        type_k=0, type_v=0)
  ref = np.load(os.path.join(fixture('llama_gqa'), 'reference.npz'))
  llm.eval(ref['tokens'][0].tolist())
  err = np.abs(np.asarray(llm.scores[:ref['tokens'].shape[1]]) - ref['logits'][0]).max()
  assert err < tolerance * np.abs(ref['logits'][0]).max()


def test_llama_arch_needs_the_permutation(llama_gqa, tmp_path, monkeypatch):
  """Without the q/k row permutation the NORM-rope reading gives different logits."""
  path = str(tmp_path / 'm.gguf')
  monkeypatch.setattr(gguf_arch, 'permute_for_norm_rope', lambda w, n: w)
  gguf_export.export_gguf(llama_gqa, path, file_type='f32')
  ref = np.load(os.path.join(fixture('llama_gqa'), 'reference.npz'))
  assert np.abs(gguf_forward(path, ref['tokens']) - ref['logits']).max() > 1e-2


def test_padded_vocab_tokens(tmp_path):
  path = str(tmp_path / 'm.gguf')
  gguf_export.export_gguf(load('padded_vocab'), path, tokenizer=fixture('padded_vocab'))
  reader = gguf.GGUFReader(path)
  tokens, types = field(reader, 'tokenizer.ggml.tokens'), field(reader, 'tokenizer.ggml.token_type')
  assert len(tokens) == 160 == field(reader, 'llama.vocab_size')
  assert tokens[150:] == [f'[PAD{i}]' for i in range(150, 160)]
  assert set(types[150:]) == {gguf.TokenType.USER_DEFINED}


def test_pre_tokenizer_recognised_from_split_regex(llama_gqa, tmp_path):
  spec = json.load(open(os.path.join(fixture('qwen2'), 'tokenizer.json')))
  qwen2_regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
  spec['pre_tokenizer'] = {'type': 'Sequence', 'pretokenizers': [
      {'type': 'Split', 'pattern': {'Regex': qwen2_regex}, 'behavior': 'Isolated', 'invert': False},
      {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': False, 'use_regex': False}]}
  folder = tmp_path / 'tok'
  os.makedirs(folder)
  (folder / 'tokenizer.json').write_text(json.dumps(spec))
  (folder / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<|im_end|>'}))
  for pre, want in ((None, 'qwen2'), ('llama-bpe', 'llama-bpe')):
    path = str(tmp_path / 'm.gguf')
    gguf_export.export_gguf(llama_gqa, path, tokenizer=str(folder), tokenizer_pre=pre)
    assert field(gguf.GGUFReader(path), 'tokenizer.ggml.pre') == want


def test_export_errors(llama_gqa, tmp_path):
  with pytest.raises(ValueError, match="unknown GGUF file type 'q4_k'; known: f32, f16, q8_0, "
                                       "q6_k, q5_k_m, q4_k_m, q4_0"):
    gguf_export.export_gguf(llama_gqa, str(tmp_path / 'a.gguf'), file_type='q4_k')
  with pytest.raises(ValueError, match=r"'qwen3' does not match the model: qk_norm=False"):
    gguf_export.export_gguf(llama_gqa, str(tmp_path / 'a.gguf'), arch='qwen3')
  with pytest.raises(ValueError, match="GGUF architecture must be one of"):
    gguf_export.export_gguf(llama_gqa, str(tmp_path / 'a.gguf'), arch='mistral')
  # A model option the architecture's graph does not compute is refused by name.
  windowed = random_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                                      n_kv_heads=2, d_ff=64, sliding_window=4))
  with pytest.raises(ValueError, match="'llama' does not hold sliding_window"):
    gguf_export.export_gguf(windowed, str(tmp_path / 'a.gguf'))
  word_level = Tokenizer(models.WordLevel({'<unk>': 0, 'a': 1}, unk_token='<unk>'))
  word_level.pre_tokenizer = pre_tokenizers.Whitespace()
  os.makedirs(tmp_path / 'wl')
  word_level.save(str(tmp_path / 'wl' / 'tokenizer.json'))
  (tmp_path / 'wl' / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<unk>'}))
  with pytest.raises(ValueError, match='only byte-level BPE'):
    gguf_export.export_gguf(llama_gqa, str(tmp_path / 'a.gguf'),
                            tokenizer=HFTokenizer(str(tmp_path / 'wl')))


def test_cli_to_gguf(tmp_path):
  out = str(tmp_path / 'q.gguf')
  assert convert.main(['to-gguf', '--src', fixture('qwen2'), '--out', out, '--type', 'q8_0']) == 0
  reader = gguf.GGUFReader(out)
  assert field(reader, 'general.architecture') == 'qwen2'
  assert tensors(reader)['blk.0.attn_q.bias'].tensor_type == Q.F32
  assert field(reader, 'tokenizer.ggml.model') == 'gpt2'      # picked up from the HF folder
  assert convert.main(['to-gguf', '--src', str(tmp_path), '--out', out]) == 1


LLAMA3_SCALING = {'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0,
                  'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}


@pytest.mark.parametrize('head_dim,scaling', [
    (64, LLAMA3_SCALING),                                     # Llama 3.2 1B / 3B
    (128, dict(LLAMA3_SCALING, factor=8.0)),                  # Llama 3.1 8B
    (8, dict(LLAMA3_SCALING, original_max_position_embeddings=16))])   # the llama32 fixture
def test_llama3_rope_freq_divisors_reproduce_the_models_frequencies(head_dim, scaling):
  from distill.models import rope
  cfg = ModelConfig(vocab_size=64, d_model=2 * head_dim, n_layers=1, n_heads=2, n_kv_heads=2,
                    d_ff=64, rope_theta=500_000.0, rope_scaling=scaling)
  divisors = gguf_arch.rope_freq_divisors(cfg)
  assert divisors.dtype == np.float32 and divisors.shape == (head_dim // 2,)
  unscaled = np.asarray(rope._plain_inv_freq(head_dim, cfg.rope_theta))
  scaled, attention = rope.inv_freq(cfg)
  assert attention == 1.0
  # llama.cpp's frequency: base frequency / rope_freqs[i].
  np.testing.assert_allclose(unscaled / divisors, np.asarray(scaled), rtol=2e-6, atol=0)
  # High frequencies kept (1), low ones divided by the factor, a strictly monotone blend between
  # (the real configs have all three bands; the fixture's 4 frequencies only the last two).
  assert divisors[-1] == scaling['factor'] and np.all(np.diff(divisors) >= 0)
  blend = (divisors > 1) & (divisors < scaling['factor'])
  assert blend.any() and np.all(np.diff(divisors[blend]) > 0)
  if head_dim > 8:
    assert divisors[0] == 1
  assert gguf_arch.rope_freq_divisors(dataclasses.replace(cfg, rope_scaling=())) is None


@pytest.mark.parametrize('file_type', ['f32', 'q8_0'])
def test_llama3_scaling_exports_rope_freqs(tmp_path, file_type):
  model = load('llama32')
  path = str(tmp_path / 'm.gguf')
  written = gguf_export.export_gguf(model, path, tokenizer=fixture('llama32'), file_type=file_type)
  reader = gguf.GGUFReader(path)
  assert field(reader, 'general.architecture') == 'llama'
  assert field(reader, 'llama.rope.freq_base') == 500_000.0
  assert field(reader, 'llama.rope.dimension_count') == 8
  got = tensors(reader)
  want = {'token_embd.weight', 'output_norm.weight', 'rope_freqs.weight'} | {
      f'blk.{l}.{n}.weight' for l in range(2) for n in LAYER_TENSORS}   # tied: no output.weight
  assert set(got) == set(written) == want
  freqs = got['rope_freqs.weight']
  assert freqs.tensor_type == Q.F32 and list(freqs.shape) == [4]
  np.testing.assert_array_equal(np.asarray(freqs.data),
                                gguf_arch.rope_freq_divisors(model.config))
  np.testing.assert_allclose(np.asarray(freqs.data), [1.8845385, 32, 32, 32], rtol=1e-6)



# ---- Gemma 2 / 3, Phi-3, linear and YaRN rope scaling -------------------------------------------

def hf_weights(name):
  """The fixture's HF tensors under the names llama.cpp's converter gives them (with arch)."""
  cfg = json.load(open(os.path.join(fixture(name), 'config.json')))
  arch = {'gemma2': 'gemma2', 'gemma3_text': 'gemma3', 'phi3': 'phi3'}.get(cfg['model_type'],
                                                                          'llama')
  name_map = gguf.get_tensor_name_map(gguf_arch.ARCHS[arch], cfg['num_hidden_layers'])
  weights = load_file(os.path.join(fixture(name), 'model.safetensors'))
  return {name_map.get_name(n, try_suffixes=('.weight', '.bias')): w for n, w in weights.items()}


@pytest.mark.parametrize('name,arch', [('gemma2', 'gemma2'), ('gemma3', 'gemma3'),
                                       ('phi3', 'phi3')])
def test_gemma_and_phi3_tensors_are_the_hf_weights_as_llama_cpp_reads_them(name, arch, tmp_path):
  """Every tensor of the f32 file is its HF tensor: Gemma's norms as 1 + w, Gemma 2's queries
  scaled to llama.cpp's fixed attention scale, Phi-3's fused qkv and gate_up as HF stores them."""
  path = str(tmp_path / 'm.gguf')
  model = load(name)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    written = gguf_export.export_gguf(model, path, tokenizer=fixture(name), file_type='f32')
  got, want = tensors(gguf.GGUFReader(path)), hf_weights(name)
  want.pop('output.weight', None) if arch == 'gemma2' else None   # gemma2 reads token_embd
  assert set(got) == set(written) == set(want)
  rescale = {'gemma2': np.sqrt(16 / 24), 'gemma3': 1.0, 'phi3': 1.0}[arch]   # head_dim / scalar
  for tensor_name, w in want.items():
    if arch != 'phi3' and tensor_name.endswith('norm.weight'):
      w = w + 1
    if tensor_name.endswith('.attn_q.weight'):
      w = w * np.float32(rescale)
    np.testing.assert_allclose(np.asarray(got[tensor_name].data), w, rtol=1e-6, atol=0,
                               err_msg=tensor_name)
  messages = [str(w.message) for w in caught]
  assert any('multiplied by 0.816497' in m for m in messages) == (arch == 'gemma2')
  assert any("phi3 ignores the sliding window" in m for m in messages) == (arch == 'phi3')


def test_gemma3_query_scale_goes_on_q_norm(tmp_path):
  """Gemma 3 normalises q after the projection: a query_pre_attn_scalar llama.cpp does not
  derive is folded into q_norm (F32), leaving the quantised q weights as trained."""
  model = load('gemma3')
  scaled = dataclasses.replace(model.config, query_pre_attn_scalar=24.0)
  model = nnx.merge(sharded.abstract_model(scaled)[0], nnx.state(model, nnx.Param))
  path = str(tmp_path / 'm.gguf')
  with pytest.warns(UserWarning, match=r'multiplied by 0\.816497 in attn_q_norm \(F32\)'):
    gguf_export.export_gguf(model, path, file_type='f32')
  got, want = tensors(gguf.GGUFReader(path)), hf_weights('gemma3')
  for layer in range(3):
    name = f'blk.{layer}.attn_q_norm.weight'
    np.testing.assert_allclose(np.asarray(got[name].data),
                               (want[name] + 1) * np.float32(np.sqrt(16 / 24)), rtol=1e-6)
    name = f'blk.{layer}.attn_q.weight'
    np.testing.assert_array_equal(np.asarray(got[name].data), want[name])


def test_gemma_and_phi3_metadata(tmp_path):
  meta = {}
  for name in ('gemma2', 'gemma3', 'phi3'):
    path = str(tmp_path / f'{name}.gguf')
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      gguf_export.export_gguf(load(name), path, tokenizer=fixture(name))
    reader = gguf.GGUFReader(path)
    meta[name] = {k.split('.', 1)[1]: field(reader, k) for k in reader.fields
                  if k.startswith(name + '.')}
    assert field(reader, 'general.architecture') == name
  g2, g3, phi = meta['gemma2'], meta['gemma3'], meta['phi3']
  assert (g2['attn_logit_softcapping'], g2['final_logit_softcapping']) == (2.0, 5.0)
  assert g2['attention.sliding_window'] == 4
  assert g2['attention.sliding_window_pattern'] == [True, False]
  assert (g2['attention.key_length'], g2['rope.dimension_count']) == (16, 16)
  assert g3['attention.sliding_window_pattern'] == [False, True, False]
  assert (g3['rope.freq_base'], g3['rope.freq_base_swa']) == (1e6, 1e4)
  assert (g3['rope.scaling.type'], g3['rope.scaling.factor']) == ('linear', 8.0)
  assert 'final_logit_softcapping' not in g3 and 'attn_logit_softcapping' not in g3
  assert (phi['rope.dimension_count'], phi['attention.key_length']) == (4, 8)   # partial 0.5
  assert phi['attention.sliding_window'] == 5


def test_attn_qkv_counts_as_attn_v_in_the_k_m_mix():
  names = [f'blk.{l}.attn_qkv.weight' for l in range(8)]
  assert mix('q4_k_m', 8, names) == {n: 'Q6_K' if int(n.split('.')[1]) in (0, 3, 6, 7) else 'Q4_K'
                                     for n in names}


YARN = {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 16}


@pytest.mark.parametrize('scaling,arch,keys', [
    ({'rope_type': 'linear', 'factor': 2.0}, 'qwen3', {'type': 'linear', 'factor': 2.0}),
    (YARN, 'llama', {'type': 'yarn', 'factor': 4.0, 'original_context_length': 16}),
    # An attention factor of its own: llama.cpp multiplies its default 1 + 0.1 ln 4 by the key.
    (dict(YARN, attention_factor=1.5), 'qwen2',
     {'type': 'yarn', 'factor': 4.0, 'original_context_length': 16,
      'attn_factor': 1.5 / (1 + 0.1 * np.log(4))})])
def test_rope_scaling_keys(tmp_path, scaling, arch, keys):
  # head_dim 8, as the llama_yarn fixture: the eager rope ops compile once for both.
  model = random_model(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                   d_ff=64, max_seq_len=64, rope_scaling=scaling,
                                   qk_norm=arch == 'qwen3', qkv_bias=arch == 'qwen2'))
  path = str(tmp_path / 'm.gguf')
  gguf_export.export_gguf(model, path)
  reader = gguf.GGUFReader(path)
  assert field(reader, 'general.architecture') == arch
  got = {k.split('rope.scaling.')[1]: field(reader, k) for k in reader.fields
         if '.rope.scaling.' in k}
  assert got.keys() == keys.keys()
  for key, value in keys.items():
    assert got[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-6)), key
  assert 'rope_freqs.weight' not in tensors(reader)


def test_what_llama_cpp_would_compute_differently_is_refused():
  def export(cfg, arch=None, **changes):   # export_gguf's check, before any weight is read
    cfg = dataclasses.replace(cfg, **changes)
    gguf_arch.check(cfg, arch or gguf_arch.default_arch(cfg))
  config = lambda name: hf.config_from_hf(hf.read_config(fixture(name)))  # noqa: E731
  small = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                      max_seq_len=64)
  with pytest.raises(ValueError, match='beta_fast=16 does not export'):
    export(small, rope_scaling=dict(YARN, beta_fast=16))
  with pytest.raises(ValueError, match="rope scaling 'llama3' does not export as GGUF "
                                       "architecture 'qwen2' \\(it takes linear, yarn\\)"):
    export(config('llama32'), arch='qwen2')
  with pytest.raises(ValueError, match="gemma2 always soft-caps"):
    export(config('gemma2'), attn_softcap=0.0)
  with pytest.raises(ValueError, match="'yarn' does not export as GGUF architecture 'gemma3'"):
    export(config('gemma3'), rope_scaling=YARN)
  with pytest.raises(ValueError, match="'gemma2' does not match the model: norm_plus_one=False"):
    export(config('llama_gqa'), arch='gemma2')


@pytest.mark.parametrize('name,tolerance', [('llama_yarn', 1e-4),
                                            # llama.cpp's CPU GELU reads an f16 table
                                            ('gemma2', 2e-3), ('gemma3', 2e-3), ('phi3', 1e-4)])
def test_llama_cpp_runs_gemma_phi3_and_yarn(name, tolerance, tmp_path):
  """The real llama.cpp (llama-cpp-python, optional) gives the model's logits. Its phi3 ignores
  sliding windows, so Phi-3 is compared with the same weights without the window."""
  llama_cpp = pytest.importorskip('llama_cpp')
  model = load(name)
  path = str(tmp_path / 'm.gguf')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    gguf_export.export_gguf(model, path, tokenizer=fixture(name), file_type='f32')
  if name == 'phi3':
    unwindowed = dataclasses.replace(model.config, sliding_window=0)
    model = nnx.merge(sharded.abstract_model(unwindowed)[0], nnx.state(model, nnx.Param))
  tokens = np.load(os.path.join(fixture(name), 'reference.npz'))['tokens']
  want = np.asarray(model(jnp.asarray(tokens)))
  llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, n_threads=1, verbose=False,
                        type_k=0, type_v=0)
  for tokens_T, want_TxV in zip(tokens, want):
    llm.reset()
    llm.eval(tokens_T.tolist())
    np.testing.assert_allclose(np.asarray(llm.scores[:len(tokens_T)]), want_TxV,
                               atol=tolerance, rtol=0)


# ---- SentencePiece-style vocabularies (Gemma, Llama 2, Phi-3-mini) ------------------------------

SPM_SPECIALS = ['<pad>', '<eos>', '<bos>', '<unk>']
SPM_TEXTS = ['the cat sat on the mat', ' two  spaces', 'héllo wörld €', 'numbers123 and then',
             'the<eos>cat']


def spm_tokenizer(folder, prefix):
  """A tiny byte-fallback BPE tokenizer.json as SentencePiece models convert to: spaces as '▁'
  (and one before the text when `prefix`, Llama 2 style; Gemma has none), <0xNN> byte tokens in
  the vocabulary after the specials."""
  tok = Tokenizer(models.BPE(byte_fallback=True, unk_token='<unk>', fuse_unk=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁')] * prefix +
                                        [normalizers.Replace(' ', '▁')])
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                   decoders.Fuse()] + [decoders.Strip(' ', 1, 0)] * prefix)
  words = 'the cat sat on a mat and then it ran to see what was there while we read'.split()
  rng = np.random.default_rng(0)
  tok.train_from_iterator([' '.join(rng.choice(words, 8)) for _ in range(200)],
                          trainers.BpeTrainer(vocab_size=330, special_tokens=SPM_SPECIALS,
                                              show_progress=False))
  spec = json.loads(tok.to_str())
  learned = sorted((i, t) for t, i in spec['model']['vocab'].items() if t not in SPM_SPECIALS)
  spec['model']['vocab'] = {t: i for i, t in enumerate(
      SPM_SPECIALS + [f'<0x{b:02X}>' for b in range(256)] + [t for _, t in learned])}
  os.makedirs(folder)
  (folder / 'tokenizer.json').write_text(json.dumps(spec, ensure_ascii=False))
  (folder / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': '<bos>', 'eos_token': '<eos>', 'pad_token': '<pad>', 'unk_token': '<unk>'}))
  return HFTokenizer(str(folder)), spec


@pytest.mark.parametrize('prefix', [False, True])
def test_sentencepiece_style_vocabulary(tmp_path, prefix):
  """Written as llama.cpp's 'llama' vocabulary: byte tokens typed BYTE, the unknown token
  UNKNOWN, a score per token that ranks merges as tokenizer.json does, add_space_prefix from the
  normaliser."""
  tokenizer, spec = spm_tokenizer(tmp_path / 'tok', prefix)
  model = random_model(ModelConfig(vocab_size=tokenizer.vocab_size + 2, d_model=32, n_layers=1,
                                   n_heads=2, n_kv_heads=2, d_ff=64))
  path = str(tmp_path / 'm.gguf')
  gguf_export.export_gguf(model, path, tokenizer=tokenizer, file_type='f32')
  reader = gguf.GGUFReader(path)
  assert (field(reader, 'tokenizer.ggml.model'), field(reader, 'tokenizer.ggml.pre')) == (
      'llama', 'default')
  assert field(reader, 'tokenizer.ggml.add_space_prefix') == prefix
  assert field(reader, 'tokenizer.ggml.unknown_token_id') == 3
  types = field(reader, 'tokenizer.ggml.token_type')
  T = gguf.TokenType
  assert types[:4] == [T.CONTROL, T.CONTROL, T.CONTROL, T.UNKNOWN]
  assert types[4:260] == [T.BYTE] * 256 and set(types[260:-2]) == {T.NORMAL}
  assert types[-2:] == [T.USER_DEFINED] * 2          # the model's ids beyond the tokenizer
  scores = field(reader, 'tokenizer.ggml.scores')
  vocab = spec['model']['vocab']
  for rank, merge in enumerate(spec['model']['merges'][:50]):
    joined = ''.join(merge.split(' ') if isinstance(merge, str) else merge)
    assert scores[vocab[joined]] >= -rank     # made by this merge or an earlier one
  assert 'tokenizer.ggml.merges' not in reader.fields


@pytest.mark.parametrize('prefix', [False, True])
def test_llama_cpp_tokenizes_sentencepiece_style_exports(tmp_path, prefix):
  """The real llama.cpp (llama-cpp-python, optional) gives the tokenizer's ids, byte fallback
  (characters outside the vocabulary) and special tokens in the text included."""
  llama_cpp = pytest.importorskip('llama_cpp')
  tokenizer, _ = spm_tokenizer(tmp_path / 'tok', prefix)
  model = random_model(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1,
                                   n_heads=2, n_kv_heads=2, d_ff=64))
  path = str(tmp_path / 'm.gguf')
  gguf_export.export_gguf(model, path, tokenizer=tokenizer, file_type='f32')
  llm = llama_cpp.Llama(model_path=path, n_ctx=16, n_threads=1, verbose=False, vocab_only=True)
  for text in SPM_TEXTS:
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text), text


def test_byte_fallback_tokenizer_without_sentencepiece_spaces_refused(tmp_path):
  tokenizer, spec = spm_tokenizer(tmp_path / 'tok', prefix=False)
  spec['normalizer'] = None
  (tmp_path / 'tok' / 'tokenizer.json').write_text(json.dumps(spec, ensure_ascii=False))
  model = random_model(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1,
                                   n_heads=2, n_kv_heads=2, d_ff=64))
  with pytest.raises(ValueError, match="exports as SentencePiece only when it writes spaces as"):
    gguf_export.export_gguf(model, str(tmp_path / 'm.gguf'), tokenizer=str(tmp_path / 'tok'))
