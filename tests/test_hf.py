"""Hugging Face import/export against committed transformers reference logits (no torch needed;
the checks that load exports back into transformers skip when it is not installed)."""
import dataclasses
import json
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import distill  # noqa: F401  (flax config)
from distill import convert
from distill.data.hf_tokenizer import ChatTemplate, ChatTemplateError, HFTokenizer
from distill.models import ModelConfig, config as config_lib, hf, load_hf, save_hf
from distill.parallel import mesh as mesh_lib
from distill.models import sharded

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')
FAMILIES = ('llama', 'llama_gqa', 'llama_tied', 'mistral', 'qwen2', 'qwen3', 'padded_vocab',
            'llama32', 'llama_yarn', 'mistral_swa', 'gemma2', 'gemma3', 'phi3')
GEMMA = dict(norm_plus_one=True, post_norms=True, embed_scale=True, mlp_activation='gelu_tanh')
# What each fixture is there to exercise (so a regenerated fixture cannot silently lose it).
FEATURES = {
    'llama': dict(n_kv_heads=4, norm_eps=1e-5),
    'llama_gqa': dict(n_kv_heads=2, rope_theta=500_000.0),
    'llama_tied': dict(tie_embeddings=True),
    'mistral': dict(n_kv_heads=1, rope_theta=1e6),
    'qwen2': dict(qkv_bias=True, tie_embeddings=True),
    'qwen3': dict(qk_norm=True, head_dim=16, d_model=32, n_heads=4),
    'padded_vocab': dict(vocab_size=160),
    'llama32': dict(tie_embeddings=True, rope_scaling=(
        ('factor', 32.0), ('high_freq_factor', 4.0), ('low_freq_factor', 1.0),
        ('original_max_position_embeddings', 16), ('rope_type', 'llama3'))),
    'llama_yarn': dict(qkv_bias=True, o_bias=True, rope_scaling=(
        ('factor', 4.0), ('original_max_position_embeddings', 16), ('rope_type', 'yarn'))),
    'mistral_swa': dict(sliding_window=4, layer_types=()),
    'gemma2': dict(GEMMA, sliding_window=4, layer_types=('sliding_attention', 'full_attention'),
                   query_pre_attn_scalar=24.0, attn_softcap=2.0, final_softcap=5.0,
                   tie_embeddings=True, qk_norm=False),
    'gemma3': dict(GEMMA, qk_norm=True, sliding_window=4, rope_local_theta=10_000.0,
                   rope_theta=1e6, rope_scaling=(('factor', 8.0), ('rope_type', 'linear')),
                   layer_types=('full_attention', 'sliding_attention', 'full_attention')),
    'phi3': dict(partial_rotary_factor=0.5, sliding_window=5, layer_types=()),
}


def fixture(name):
  return os.path.join(FIXTURES, name)


def reference(name):
  ref = np.load(os.path.join(fixture(name), 'reference.npz'))
  return ref['tokens'], ref['logits']


def one_device_mesh():
  return mesh_lib.make_mesh({'data': 1})


def flat_params(model_or_params):
  state = model_or_params
  if isinstance(model_or_params, nnx.Module):
    state = nnx.state(model_or_params, nnx.Param)
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.mark.parametrize('name', FAMILIES)
def test_logits_match_transformers(name):
  model = load_hf(fixture(name))
  for field, value in FEATURES[name].items():
    assert getattr(model.config, field) == value, field
  tokens, want = reference(name)
  got = np.asarray(model(tokens))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_sharded_load_reads_only_each_devices_slice(monkeypatch):
  mesh = mesh_lib.make_mesh({'fsdp': 2, 'tensor': 4})
  reads = []   # (tensor name, elements read, elements in the tensor)
  real_open = hf._open

  class SpySlice:
    def __init__(self, name, inner):
      self.name, self.inner = name, inner

    def get_shape(self):
      return self.inner.get_shape()

    def get_dtype(self):
      return self.inner.get_dtype()

    def __getitem__(self, index):
      block = self.inner[index]
      reads.append((self.name, block.size, int(np.prod(self.inner.get_shape()))))
      return block

  class SpyFile:
    def __init__(self, path):
      self.handle = real_open(path)

    def __enter__(self):
      self.inner = self.handle.__enter__()
      return self

    def __exit__(self, *exc):
      return self.handle.__exit__(*exc)

    def keys(self):
      return self.inner.keys()

    def get_slice(self, name):
      return SpySlice(name, self.inner.get_slice(name))

  monkeypatch.setattr(hf, '_open', SpyFile)
  _, params, cfg = hf.load_hf_params(fixture('llama_gqa'), mesh)
  _, abstract = sharded.abstract_model(cfg)
  want = sharded.param_shardings(abstract, mesh)
  assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(want)) > 0   # zip would truncate
  for got_leaf, want_sharding in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert got_leaf.sharding == want_sharding
  w_gate = params['layers']['w_gate'][...]
  assert w_gate.addressable_shards[0].data.shape == (2, 16, 16)   # [L, D/fsdp, F/tensor]
  gate_reads = [(size, full) for name, size, full in reads if 'gate_proj' in name]
  assert gate_reads and all(size * 8 == full for size, full in gate_reads)
  # Same values as an unsharded load.
  _, single, _ = hf.load_hf_params(fixture('llama_gqa'), one_device_mesh())
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_load():
  model = load_hf(fixture('qwen3'), dtype='bfloat16', mesh=one_device_mesh())
  assert model.config.param_dtype == 'bfloat16' and model.config.dtype == 'bfloat16'
  assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in jax.tree.leaves(nnx.state(model)))
  tokens, want = reference('qwen3')
  got = np.asarray(model(tokens))
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_load_dtype_checked():
  with pytest.raises(ValueError, match="dtype must be one of .*'int8'"):
    load_hf(fixture('llama'), dtype='int8')
  accepted = r"dtype must be one of \('float32', 'bfloat16', 'float16'\)"
  with pytest.raises(ValueError, match=accepted):
    load_hf(fixture('llama'), dtype=np.int32)
  if 'float16' not in config_lib.DTYPES:
    for float16 in ('float16', np.float16, jnp.float16):
      with pytest.raises(ValueError, match='float16.*not supported by ModelConfig'):
        load_hf(fixture('llama'), dtype=float16)


@pytest.mark.parametrize('dtype, name', [(jnp.float32, 'float32'), (np.float32, 'float32'),
                                         (jnp.bfloat16, 'bfloat16'), ('bfloat16', 'bfloat16')])
def test_load_dtype_accepts_jax_and_numpy_dtypes(dtype, name):
  _, params, cfg = hf.load_hf_params(fixture('llama'), one_device_mesh(), dtype=dtype)
  assert cfg.param_dtype == cfg.dtype == name
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(name)}


@pytest.mark.parametrize('name', FAMILIES)
def test_import_export_import_is_identity(name, tmp_path):
  model = load_hf(fixture(name), mesh=one_device_mesh())
  save_hf(model, str(tmp_path), tokenizer=fixture(name))
  again = load_hf(str(tmp_path), mesh=one_device_mesh())
  assert again.config == model.config
  a, b = flat_params(model), flat_params(again)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  original = set(json.load(open(os.path.join(fixture(name), hf.INDEX_FILE)))['weight_map']) \
      if os.path.exists(os.path.join(fixture(name), hf.INDEX_FILE)) else \
      set(load_file(os.path.join(fixture(name), hf.SINGLE_FILE)))
  assert set(load_file(str(tmp_path / hf.SINGLE_FILE))) == original
  assert os.path.exists(tmp_path / 'tokenizer.json')
  config = json.load(open(tmp_path / 'config.json'))
  assert (config['bos_token_id'], config['eos_token_id']) == (0, 2)


def test_export_architecture_choice(tmp_path):
  qwen2 = load_hf(fixture('qwen2'), mesh=one_device_mesh())
  with pytest.raises(ValueError, match='cannot hold q/k/v biases'):
    save_hf(qwen2, str(tmp_path / 'a'), architecture='LlamaForCausalLM')
  qwen3 = load_hf(fixture('qwen3'), mesh=one_device_mesh())
  with pytest.raises(ValueError, match='qk_norm'):
    save_hf(qwen3, str(tmp_path / 'b'), architecture='Qwen2ForCausalLM')
  with pytest.raises(ValueError, match='not one of'):
    save_hf(qwen3, str(tmp_path / 'b'), architecture='GPT2LMHeadModel')
  # A bias-free Llama saved as Qwen2 gets zero biases and computes the same function.
  llama = load_hf(fixture('llama_gqa'), mesh=one_device_mesh())
  save_hf(llama, str(tmp_path / 'c'), architecture='Qwen2ForCausalLM')
  as_qwen2 = load_hf(str(tmp_path / 'c'), mesh=one_device_mesh())
  assert as_qwen2.config.qkv_bias
  assert not np.any(np.asarray(as_qwen2.layers.bq[...]))
  tokens, want = reference('llama_gqa')
  np.testing.assert_allclose(np.asarray(as_qwen2(tokens)), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize('name,architecture', [('qwen3', None), ('qwen2', None),
                                               ('padded_vocab', None),
                                               ('llama_gqa', 'MistralForCausalLM'),
                                               ('llama32', None), ('llama_yarn', None),
                                               ('mistral_swa', None), ('gemma2', None),
                                               ('gemma3', None), ('phi3', None),
                                               ('llama_gqa', 'Phi3ForCausalLM')])
def test_export_loads_in_transformers(name, architecture, tmp_path):
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  model = load_hf(fixture(name), mesh=one_device_mesh())
  save_hf(model, str(tmp_path), tokenizer=fixture(name), architecture=architecture)
  hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), output_loading_info=True, attn_implementation='eager', dtype=torch.float32)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  tokens, _ = reference(name)
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(model(tokens)), atol=1e-4, rtol=0)


# ---- config.json errors ------------------------------------------------------------------------

def base_config(name='llama'):
  return json.load(open(os.path.join(fixture(name), 'config.json')))


@pytest.mark.parametrize('name,change,match', [
    ('llama', {'rope_scaling': {'rope_type': 'longrope', 'factor': 8.0}},
     "rope type 'longrope' is not implemented; supported rope types: default, linear, dynamic, "
     "llama3, yarn"),
    ('qwen3', {'rope_parameters': {'rope_type': 'su', 'rope_theta': 1e6}}, "'su'"),
    ('llama', {'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}},
     r"llama3\) lacks \['low_freq_factor', 'high_freq_factor'\]"),
    ('qwen2', {'layer_types': ['sliding_attention', 'full_attention']}, 'layer_types'),
    ('llama', {'partial_rotary_factor': 0.5}, 'partial_rotary_factor=0.5'),
    ('gemma2', {'hidden_activation': 'gelu'}, "hidden_act='gelu'"),
    ('gemma3', {'use_bidirectional_attention': True}, 'use_bidirectional_attention'),
    ('llama', {'architectures': ['Qwen2MoeForCausalLM']}, 'Qwen2MoeForCausalLM'),
    ('llama', {'num_local_experts': 8}, 'num_local_experts=8'),
    ('llama', {'hidden_act': 'gelu'}, "hidden_act='gelu'"),
    ('llama', {'mlp_bias': True}, 'mlp_bias'),
    ('llama', {'hidden_size': None}, "'hidden_size' is missing"),
])
def test_unsupported_config_fields_are_named(name, change, match):
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf({**base_config(name), **change})


def test_config_translation_of_plain_fields():
  cfg = hf.config_from_hf(base_config('qwen3'))
  assert cfg == ModelConfig(vocab_size=150, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            d_ff=64, head_dim=16, max_seq_len=64, rope_theta=1e6, norm_eps=1e-6,
                            qk_norm=True)
  legacy = {**base_config('llama'), 'rope_theta': 1234.0}   # transformers 4 layout
  del legacy['rope_parameters']
  assert hf.config_from_hf(legacy).rope_theta == 1234.0
  # The exported config.json translates back to the same ModelConfig.
  for arch in ('LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM'):
    plain = dataclasses.replace(cfg, qk_norm=False, head_dim=8)
    back = hf.config_from_hf(hf.hf_config(plain, arch))
    assert back == dataclasses.replace(plain, qkv_bias=arch == 'Qwen2ForCausalLM')


def test_config_translation_of_window_rope_and_bias_layouts():
  # Gemma 3 as published (transformers 4 layout: flat rope fields, a pattern instead of
  # layer_types) is the same model as the fixture's transformers 5 layout.
  nested = base_config('gemma3')
  legacy = {k: v for k, v in nested.items() if k not in ('rope_parameters', 'layer_types')}
  legacy.update(rope_theta=1e6, rope_local_base_freq=10_000.0, sliding_window_pattern=2,
                rope_scaling={'rope_type': 'linear', 'factor': 8.0})
  assert hf.config_from_hf(legacy) == dataclasses.replace(
      hf.config_from_hf(nested),
      layer_types=('sliding_attention', 'full_attention', 'sliding_attention'))
  # Qwen2's window covers the layers from max_window_layers on, and only with use_sliding_window.
  qwen2 = {k: v for k, v in base_config('qwen2').items() if k != 'layer_types'}
  qwen2.update(sliding_window=8, max_window_layers=1)
  assert hf.config_from_hf(qwen2).sliding_window == 0
  cfg = hf.config_from_hf({**qwen2, 'use_sliding_window': True})
  assert (cfg.sliding_window, cfg.sliding_layers) == (8, (False, True))
  # A window as long as the context is no window.
  assert hf.config_from_hf({**base_config('mistral'), 'sliding_window': 64}).sliding_window == 0
  assert hf.config_from_hf({**base_config('mistral'), 'sliding_window': 63}).sliding_window == 63
  cfg = hf.config_from_hf({**base_config('llama'), 'attention_bias': True})
  assert cfg.qkv_bias and cfg.o_bias
  # Dynamic NTK within the original context is plain RoPE; the table says so.
  dynamic = hf.config_from_hf({**base_config('llama'),
                               'rope_scaling': {'rope_type': 'dynamic', 'factor': 4.0}})
  assert dynamic.rope_scaling_dict == {'rope_type': 'dynamic', 'factor': 4.0,
                                       'original_max_position_embeddings': 64}
  with pytest.raises(ValueError, match='dynamic rope is implemented only up to'):
    dataclasses.replace(dynamic, max_seq_len=65)


def test_export_refuses_architectures_that_cannot_hold_the_model(tmp_path):
  gemma3 = load_hf(fixture('gemma3'), mesh=one_device_mesh())
  for arch, match in (('LlamaForCausalLM', 'Gemma architectures'),
                      ('Gemma2ForCausalLM', 'qk_norm')):
    with pytest.raises(ValueError, match=match):
      save_hf(gemma3, str(tmp_path / arch), architecture=arch)
  phi3 = load_hf(fixture('phi3'), mesh=one_device_mesh())
  with pytest.raises(ValueError, match='partial rotary'):
    save_hf(phi3, str(tmp_path / 'llama'), architecture='LlamaForCausalLM')
  mistral = load_hf(fixture('mistral_swa'), mesh=one_device_mesh())
  with pytest.raises(ValueError, match='no sliding-window'):
    save_hf(mistral, str(tmp_path / 'llama'), architecture='LlamaForCausalLM')


# ---- folder and tensor errors ------------------------------------------------------------------

def copy_fixture(tmp_path, name='llama'):
  dst = tmp_path / name
  shutil.copytree(fixture(name), dst)
  return dst


def rewrite(folder, fn):
  path = str(folder / hf.SINGLE_FILE)
  save_file(fn(load_file(path)), path)


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no config.json'):
    load_hf(str(tmp_path))
  folder = copy_fixture(tmp_path)
  os.remove(folder / hf.SINGLE_FILE)
  with pytest.raises(FileNotFoundError, match='no weights'):
    load_hf(str(folder))
  sharded = copy_fixture(tmp_path, 'llama_gqa')
  os.remove(sharded / 'model-00002-of-00002.safetensors')
  with pytest.raises(FileNotFoundError, match='model-00002-of-00002.safetensors'):
    load_hf(str(sharded))


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
  folder = copy_fixture(tmp_path)
  rewrite(folder, lambda t: {k: v for k, v in t.items() if k != 'model.layers.1.mlp.up_proj.weight'})
  with pytest.raises(ValueError, match=r'missing 1: model\.layers\.1\.mlp\.up_proj\.weight'):
    load_hf(str(folder))
  folder = copy_fixture(tmp_path / 'x')
  rewrite(folder, lambda t: {**t, 'model.layers.2.mlp.up_proj.weight': np.zeros((64, 32), np.float32)})
  with pytest.raises(ValueError, match=r'unexpected 1: model\.layers\.2\.mlp\.up_proj\.weight'):
    load_hf(str(folder))
  folder = copy_fixture(tmp_path / 'y')
  rewrite(folder, lambda t: {**t, 'model.norm.weight': np.ones(31, np.float32)})
  with pytest.raises(ValueError, match=r"'model\.norm\.weight'.*expected shape \[32\], got \[31\]"):
    load_hf(str(folder))
  folder = copy_fixture(tmp_path / 'z')
  rewrite(folder, lambda t: {**t, 'model.norm.weight': np.ones(32, np.int8)})
  with pytest.raises(ValueError, match=r"'model\.norm\.weight'.*stored as I8"):
    load_hf(str(folder))


def test_truncated_safetensors_is_named(tmp_path):
  folder = copy_fixture(tmp_path)
  path = folder / hf.SINGLE_FILE
  path.write_bytes(path.read_bytes()[:-1000])
  with pytest.raises(ValueError, match='corrupt or truncated safetensors file .*model.safetensors'):
    load_hf(str(folder))


def test_unsupported_config_fails_before_reading_weights(tmp_path):
  folder = copy_fixture(tmp_path)
  (folder / 'config.json').write_text(json.dumps({**base_config(), 'hidden_act': 'relu'}))
  os.remove(folder / hf.SINGLE_FILE)   # never reached
  with pytest.raises(ValueError, match='hidden_act'):
    load_hf(str(folder))


# ---- CLI: HF <-> distill run export -------------------------------------------------------------

def test_cli_hf_to_distill_and_back(tmp_path):
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'hf')
  assert convert.main(['hf-to-distill', '--src', fixture('qwen2'), '--out', workdir]) == 0
  assert os.path.exists(os.path.join(workdir, 'model.json'))
  assert convert.main(['distill-to-hf', '--src', workdir, '--out', out,
                       '--tokenizer', fixture('qwen2')]) == 0
  original, exported = load_file(os.path.join(fixture('qwen2'), hf.SINGLE_FILE)), \
      load_file(os.path.join(out, hf.SINGLE_FILE))
  assert original.keys() == exported.keys()
  for key in original:
    np.testing.assert_array_equal(original[key], exported[key], err_msg=key)
  assert convert.main(['distill-to-hf', '--src', str(tmp_path / 'nothing'), '--out', out]) == 1


# ---- chat templates: Qwen3's thinking mode ------------------------------------------------------

THINKING = os.path.join(os.path.dirname(__file__), 'fixtures', 'qwen3_thinking')
QUESTION = {'role': 'user', 'content': 'two plus two?'}
ANSWER = 'four.'


def thinking_template():
  return HFTokenizer(THINKING).chat_template


@pytest.mark.parametrize('last', [
    {'role': 'assistant', 'content': ANSWER, 'reasoning_content': 'add them.'},
    {'role': 'assistant', 'content': '<think>\nadd them.\n</think>\n\n' + ANSWER}])
def test_thinking_mode_split(last):
  """Thinking on: the completion is the reasoning block then the answer; off: the prompt opens
  an empty think block and the completion is the answer alone. Reasoning as reasoning_content
  or inline in the content splits the same; an earlier turn's reasoning never reaches the prompt."""
  template = thinking_template()
  assert template.has_thinking_switch
  earlier = [{'role': 'user', 'content': 'hi'},
             {'role': 'assistant', 'content': '<think>secret</think>hello.'}]
  for history in ([], earlier):
    messages = history + [QUESTION, last]
    on = template.split(messages, enable_thinking=True)
    off = template.split(messages, enable_thinking=False)
    assert on[1] == '<think>\nadd them.\n</think>\n\n' + ANSWER
    assert on[0].endswith('<|im_start|>user\ntwo plus two?<|im_end|>\n<|im_start|>assistant\n')
    assert off == (on[0] + '<think>\n\n</think>\n\n', ANSWER)
    assert template.split(messages) == on     # the template's default: thinking
    assert 'secret' not in on[0] + off[0] and ('hello.' in on[0]) == bool(history)
  tokenizer = HFTokenizer(THINKING)
  ids = tokenizer.encode(on[1])
  assert ids[0] == tokenizer.token_id('<think>') == 150 and tokenizer.token_id('</think>') in ids
  assert tokenizer.encode(off[1]) == tokenizer.encode(ANSWER)


@pytest.mark.parametrize('teacher_thinking,student_thinking', [(True, False), (False, True)])
def test_split_thinking_teacher_and_student_views(teacher_thinking, student_thinking):
  template = thinking_template()
  messages = [QUESTION, {'role': 'assistant', 'content': ANSWER, 'reasoning_content': 'add.'}]
  views = template.split_thinking(messages, teacher_thinking=teacher_thinking,
                                  student_thinking=student_thinking)
  assert views.answer == ANSWER
  thinking, plain = template.split(messages, enable_thinking=True), template.split(
      messages, enable_thinking=False)
  assert (views.teacher, views.student) == ((thinking, plain) if teacher_thinking else
                                            (plain, thinking))
  assert views.teacher[1].endswith(ANSWER) and views.student[1].endswith(ANSWER)
  # The default mode travels with the template (and through pickling, for grain workers).
  student = pickle.loads(pickle.dumps(template.with_thinking(student_thinking)))
  assert student.enable_thinking is student_thinking
  assert student.split(messages) == views.student


def test_thinking_mode_errors():
  plain = HFTokenizer(fixture('qwen2')).chat_template   # ChatML without the switch
  assert not plain.has_thinking_switch
  messages = [QUESTION, {'role': 'assistant', 'content': ANSWER}]
  with pytest.raises(ValueError, match="no thinking mode: it never reads 'enable_thinking'"):
    plain.split(messages, enable_thinking=False)
  with pytest.raises(ValueError, match='no thinking mode'):
    plain.with_thinking(True)
  with pytest.raises(ValueError, match="enable_thinking must be True, False or None, got 'no'"):
    thinking_template().with_thinking('no')
  # A template whose answer differs with and without thinking cannot align the two views.
  odd = thinking_template().source.replace(
      "'\\n</think>\\n\\n' + answer.lstrip('\\n')",
      "'\\n</think>\\n\\n' + answer + (' (reasoned)' if thought else '')")
  assert odd != thinking_template().source
  template = ChatTemplate(odd, thinking_template().special_tokens)
  with pytest.raises(ChatTemplateError, match="row 7: the teacher's completion \\(thinking on\\) "
                                              "does not end with the answer"):
    template.split_thinking([QUESTION, {'role': 'assistant', 'content': 'x', 'reasoning_content':
                                        'y'}], teacher_thinking=True, student_thinking=False,
                            row='row 7')
