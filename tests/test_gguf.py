"""GGUF export read back with gguf.GGUFReader: names, shapes, types, metadata, q8_0 accuracy, and a
numpy forward pass with llama.cpp's conventions that must reproduce transformers' logits."""
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

import distill  # noqa: F401  (flax config)
from distill import convert
from distill.data.hf_tokenizer import HFTokenizer
from distill.models import ModelConfig, load_hf
from distill.models import gguf_export
from distill.parallel import mesh as mesh_lib
from distill.models import sharded

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
  cfg = ModelConfig(vocab_size=64, d_model=48, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
  graphdef, abstract = sharded.abstract_model(cfg)
  rng = np.random.default_rng(0)   # numpy weights: no eager random-init compilation
  model = nnx.merge(graphdef, jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), abstract))
  written = gguf_export.export_gguf(model, str(tmp_path / 'm.gguf'), file_type='q8_0')
  assert written['blk.0.attn_q.weight'] == 'F16'     # rows of d_model=48
  assert written['blk.0.ffn_down.weight'] == 'Q8_0'  # rows of d_ff=64
  reader = gguf.GGUFReader(str(tmp_path / 'm.gguf'))
  assert field(reader, 'tokenizer.ggml.model') == 'none'


# ---- llama.cpp conventions, in numpy -------------------------------------------------------------

def rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x_BxTxHxD, theta, adjacent):
  """llama.cpp RoPE: NORM rotates pairs (2i, 2i+1), NEOX pairs (i, i + D/2)."""
  D = x_BxTxHxD.shape[-1]
  angle = np.arange(x_BxTxHxD.shape[1])[:, None] * theta ** (-np.arange(0, D, 2) / D)
  cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
  if adjacent:
    a, b = x_BxTxHxD[..., 0::2], x_BxTxHxD[..., 1::2]
    return np.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(x_BxTxHxD.shape)
  a, b = x_BxTxHxD[..., :D // 2], x_BxTxHxD[..., D // 2:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def gguf_forward(path, tokens_BxT):
  """Logits of an f32 GGUF file computed the way llama.cpp reads it."""
  reader = gguf.GGUFReader(path)
  arch = field(reader, 'general.architecture')
  meta = lambda key: field(reader, f'{arch}.{key}')  # noqa: E731
  W = {n: np.asarray(t.data, np.float64) for n, t in tensors(reader).items()}
  H, K, Dh = meta('attention.head_count'), meta('attention.head_count_kv'), meta('attention.key_length')
  eps, theta = meta('attention.layer_norm_rms_epsilon'), meta('rope.freq_base')
  adjacent = arch == 'llama'   # llama.cpp: LLAMA_ROPE_TYPE_NORM; qwen2/qwen3: NEOX
  B, T = tokens_BxT.shape
  x = W['token_embd.weight'][tokens_BxT]
  causal = np.tril(np.ones((T, T), bool))
  for l in range(meta('block_count')):
    p = lambda n: W.get(f'blk.{l}.{n}')  # noqa: E731
    h = rms(x, p('attn_norm.weight'), eps)
    proj = {}
    for n, heads in (('q', H), ('k', K), ('v', K)):
      y = h @ p(f'attn_{n}.weight').T
      if p(f'attn_{n}.bias') is not None:
        y = y + p(f'attn_{n}.bias')
      proj[n] = y.reshape(B, T, heads, Dh)
    q, k, v = proj['q'], proj['k'], proj['v']
    if p('attn_q_norm.weight') is not None:
      q, k = rms(q, p('attn_q_norm.weight'), eps), rms(k, p('attn_k_norm.weight'), eps)
    q, k = rope(q, theta, adjacent), rope(k, theta, adjacent)
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    scores = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(Dh)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum('bhts,bshd->bthd', probs, v).reshape(B, T, H * Dh) @ p('attn_output.weight').T
    h = rms(x, p('ffn_norm.weight'), eps)
    gate = h @ p('ffn_gate.weight').T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ p('ffn_up.weight').T)) @ p('ffn_down.weight').T
  out = W.get('output.weight', W['token_embd.weight'])   # tied: llama.cpp reuses token_embd
  return rms(x, W['output_norm.weight'], eps) @ out.T


@pytest.mark.parametrize('name,arch', [('llama_gqa', 'llama'), ('qwen2', 'qwen2'),
                                       ('qwen3', 'qwen3'), ('mistral', 'llama')])
def test_llama_cpp_conventions_reproduce_transformers_logits(name, arch, tmp_path):
  path = str(tmp_path / 'm.gguf')
  gguf_export.export_gguf(load(name), path, tokenizer=fixture(name), file_type='f32')
  assert field(gguf.GGUFReader(path), 'general.architecture') == arch
  ref = np.load(os.path.join(fixture(name), 'reference.npz'))
  np.testing.assert_allclose(gguf_forward(path, ref['tokens']), ref['logits'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', ['llama_gqa', 'qwen2', 'qwen3', 'padded_vocab'])
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
  monkeypatch.setattr(gguf_export, 'permute_for_norm_rope', lambda w, n: w)
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
  with pytest.raises(ValueError, match='file_type'):
    gguf_export.export_gguf(llama_gqa, str(tmp_path / 'a.gguf'), file_type='q4_k')
  with pytest.raises(ValueError, match="'qwen3' does not match"):
    gguf_export.export_gguf(llama_gqa, str(tmp_path / 'a.gguf'), arch='qwen3')
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
