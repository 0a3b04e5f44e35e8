"""Teachers with another tokenizer: span alignment on hand-checked strings, ULD and the span
losses against float64 formulas, the method's checks, and a short run end to end.

Fixture tokenizers are made with `tokenizers` from explicit vocabularies and merges, so every
tokenization below is known by hand: a "Llama-style" one (BPE, metaspace '▁' prefix, <s>/</s>)
and a "Qwen-style" one (byte-level BPE, 'Ġ' for a space, no BOS), besides the embedded tasks'
CharTokenizer.
"""
from __future__ import annotations

import json
import re
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from distill import losses
from distill.data import cross_tokenizer as alignment
from distill.data import pipeline
from distill.data.hf_tokenizer import HFTokenizer
from distill.data.tokenizer import CharTokenizer
from distill.losses import cross_tokenizer as xtok

DIGITS = list('0123456789+=;#')


def _save(tokenizer: Tokenizer, folder, specials: dict) -> HFTokenizer:
  os.makedirs(folder, exist_ok=True)
  tokenizer.save(os.path.join(folder, 'tokenizer.json'))
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump(specials, f)
  return HFTokenizer(str(folder))


def _bpe(specials: list[str], alphabet: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
  vocab = {t: i for i, t in enumerate(specials + alphabet + [a + b for a, b in merges])}
  tokenizer = Tokenizer(models.BPE(vocab, merges))
  tokenizer.add_special_tokens(specials)
  return tokenizer


@pytest.fixture(scope='module')
def llama_style(tmp_path_factory):
  """'▁ab' '▁cd' are tokens, '12' and '+3' too; <s> is BOS."""
  tok = _bpe(['<unk>', '<s>', '</s>'], ['▁', 'a', 'b', 'c', 'd'] + DIGITS,
             [('▁', 'a'), ('▁a', 'b'), ('▁', 'c'), ('▁c', 'd'), ('1', '2'), ('+', '3')])
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first')
  tok.decoder = decoders.Metaspace(replacement='▁', prepend_scheme='first')
  return _save(tok, tmp_path_factory.mktemp('llama'),
               {'bos_token': '<s>', 'eos_token': '</s>', 'pad_token': '<unk>',
                'add_bos_token': True})


@pytest.fixture(scope='module')
def qwen_style(tmp_path_factory):
  """Byte-level: a space is 'Ġ'; 'ab', 'Ġc', '34' are tokens; no BOS (EOS doubles as pad)."""
  tok = _bpe(['<|endoftext|>'], ['Ġ', 'a', 'b', 'c', 'd'] + DIGITS,
             [('a', 'b'), ('Ġ', 'c'), ('3', '4')])
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return _save(tok, tmp_path_factory.mktemp('qwen'), {'eos_token': '<|endoftext|>'})


def _spans(student, teacher, text):
  return alignment.target_spans(student, teacher, student.encode(text), teacher.encode(text),
                                text)


def test_spans_of_hand_checked_strings(llama_style, qwen_style):
  char = CharTokenizer()
  # '12+34': char 1|2|+|3|4, qwen 1|2|+|34 (shared ends 1, 2, 3, 5), llama ▁|12|+3|4.
  assert [qwen_style.tokenizer.id_to_token(i) for i in qwen_style.encode('12+34')] == \
      ['1', '2', '+', '34']
  assert [llama_style.tokenizer.id_to_token(i) for i in llama_style.encode('12+34')] == \
      ['▁', '12', '+3', '4']
  student, teacher, n = _spans(char, qwen_style, '12+34')
  assert (student.tolist(), teacher.tolist(), n) == ([0, 1, 2, 3, 3, 4], [0, 1, 2, 3, 4], 5)
  # Llama's leading '▁' decodes to nothing: it joins the first span ('12').
  student, teacher, n = _spans(char, llama_style, '12+34')
  assert (student.tolist(), teacher.tolist(), n) == ([0, 0, 1, 1, 2, 3], [0, 0, 1, 2, 3], 4)
  # 'ab cd': llama ▁ab|▁cd (ends 2, 5); qwen ab|Ġc|d (ends 2, 4, 5): spans 'ab' | ' cd'.
  student, teacher, n = _spans(llama_style, qwen_style, 'ab cd')
  assert (student.tolist(), teacher.tolist(), n) == ([0, 1, 2], [0, 1, 1, 2], 3)


def test_spans_refuse_a_tokenizer_that_does_not_round_trip(qwen_style):
  with pytest.raises(ValueError, match='does not decode its own tokens'):
    alignment.target_spans(CharTokenizer(), qwen_style, [5], qwen_style.encode('12'), '12')


def test_teacher_fields_put_spans_at_target_columns(llama_style, qwen_style):
  char = CharTokenizer()
  lengths = dict(prompt_len=5, completion_len=7)
  row = pipeline.encode_example(char, '1+1=', '12+34', **lengths)
  # <s> ▁ 1 + 1 = : one token more than the student's row has room for.
  with pytest.raises(ValueError, match=r'\(teacher tokenizer\): prompt .* needs 6 tokens'):
    pipeline.teacher_fields(row, char, llama_style, '1+1=', '12+34', **lengths)
  fields = pipeline.teacher_fields(row, char, qwen_style, '1+1=', '12+34', **lengths)
  # Target columns start at prompt_len - 1 = 4 in both layouts.
  assert fields['span_ids'].tolist() == [-1] * 4 + [0, 1, 2, 3, 3, 4, -1, -1]
  assert fields['teacher_span_ids'].tolist() == [-1] * 4 + [0, 1, 2, 3, 4, -1, -1, -1]
  # Qwen has no pad of its own (EOS pads): read the row where its input mask is set.
  content = fields['teacher_tokens'][fields['teacher_input_mask'] == 1]
  assert qwen_style.decode(content) == '1+1=12+34'


def test_shared_vocabulary_pairs_tokens_of_one_text(qwen_style):
  student_ids, teacher_ids = alignment.shared_vocabulary(CharTokenizer(), qwen_style)
  char = CharTokenizer()
  pairs = {char.decode([s]) or '<eos>': qwen_style.decode([t]) or '<eos>'
           for s, t in zip(student_ids.tolist(), teacher_ids.tolist())}
  # Every single character both have ('Ġ' is a space), and EOS; never 'ab' or '34'.
  assert pairs == {c: c for c in [' ', 'a', 'b', 'c', 'd', '<eos>'] + DIGITS}
  assert qwen_style.eos_id in teacher_ids.tolist() and char.eos_id in student_ids.tolist()


def _softmax64(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_uld_matches_float64_reference():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(3, 4, 7)) * 2, rng.normal(size=(3, 4, 11)) * 2
  mask = rng.random((3, 4)) < 0.7
  uld = jax.jit(xtok.uld, static_argnames='temperature')   # one compilation, not op by op
  got = uld(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
            jnp.asarray(mask), temperature=1.5)
  q = -np.sort(-_softmax64(student / 1.5), -1)
  p = -np.sort(-_softmax64(teacher / 1.5), -1)
  q = np.concatenate([q, np.zeros((3, 4, 4))], -1)   # the smaller vocabulary padded with 0
  want = np.where(mask, np.abs(q - p).sum(-1), 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Identical distributions up to a permutation of the vocabulary: zero distance.
  same = uld(jnp.asarray(teacher[..., ::-1]), jnp.asarray(teacher), jnp.asarray(mask))
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_uld_topk_matches_float64_reference_and_uld_at_k_v_minus_1():
  """The teacher as its k largest probabilities and the tail as one entry, sorted (the tail
  may outrank some of the top-k), against the student's sorted distribution; at k = V − 1
  the full ULD."""
  rng = np.random.default_rng(1)
  student, teacher = rng.normal(size=(3, 4, 7)) * 2, rng.normal(size=(3, 4, 11)) * 2
  mask = rng.random((3, 4)) < 0.7
  uld_topk = jax.jit(xtok.uld_topk)
  log_p = np.log(_softmax64(teacher))
  q = -np.sort(-_softmax64(student), -1)
  for k in (2, 10):
    top = -np.sort(-log_p, -1)[..., :k]
    got = uld_topk(jnp.asarray(student, jnp.float32), jnp.asarray(top, jnp.float32),
                   jnp.asarray(mask))
    p_top = np.exp(top)
    p = -np.sort(-np.concatenate([p_top, 1.0 - p_top.sum(-1, keepdims=True)], -1), -1)
    width = max(q.shape[-1], p.shape[-1])
    pad = lambda x: np.concatenate([x, np.zeros((3, 4, width - x.shape[-1]))], -1)
    want = np.where(mask, np.abs(pad(q) - pad(p)).sum(-1), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  full = jax.jit(xtok.uld)(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                           jnp.asarray(mask))
  np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-6)   # k = 10 = V − 1


def _span_kl64(log_t, log_s):
  top = np.log1p(-xtok.SPAN_EPS)
  pt, ps = np.exp(np.minimum(log_t, top)), np.exp(np.minimum(log_s, top))
  return pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))


def test_span_terms_match_float64_reference():
  """Spans of '12+34' (char student vs qwen-style teacher, hand-checked above) on random
  logits: span log-probabilities are sums of the tokens' log-probabilities, the span term the
  Bernoulli KL of the two, the vocab term forward KL over the shared ids at span starts."""
  rng = np.random.default_rng(1)
  T, Vs, Vt = 8, 9, 6
  rows = {'span_ids': np.array([[-1, 0, 1, 2, 3, 3, 4, -1]]),
          'teacher_span_ids': np.array([[-1, 0, 1, 2, 3, 4, -1, -1]]),
          'targets': rng.integers(0, Vs, (1, T)), 'teacher_targets': rng.integers(0, Vt, (1, T))}
  student, teacher = rng.normal(size=(1, T, Vs)) * 2, rng.normal(size=(1, T, Vt)) * 2
  student_ids, teacher_ids = np.array([0, 3, 5]), np.array([2, 1, 4])
  terms = jax.jit(lambda s, t, r: xtok.span_terms(
      s, t, r, num_spans=T, vocab_divergence=losses.get('forward_kl'),
      student_ids_K=student_ids, teacher_ids_K=teacher_ids))
  got_span, got_vocab, mask, starts = terms(jnp.asarray(student, jnp.float32),
                                            jnp.asarray(teacher, jnp.float32), rows)
  log_q, log_p = np.log(_softmax64(student)), np.log(_softmax64(teacher))
  want_span, want_vocab = np.zeros(T), np.zeros(T)
  for s in range(5):
    cols_s = np.flatnonzero(rows['span_ids'][0] == s)
    cols_t = np.flatnonzero(rows['teacher_span_ids'][0] == s)
    ls = sum(log_q[0, c, rows['targets'][0, c]] for c in cols_s)
    lt = sum(log_p[0, c, rows['teacher_targets'][0, c]] for c in cols_t)
    want_span[s] = _span_kl64(lt, ls)
    q = _softmax64(student[0, cols_s[0], student_ids])
    p = _softmax64(teacher[0, cols_t[0], teacher_ids])
    want_vocab[s] = np.sum(p * np.log(p / q))
  np.testing.assert_array_equal(mask[0], np.arange(T) < 5)
  np.testing.assert_array_equal(starts[0, :5], [1, 2, 3, 4, 6])
  np.testing.assert_allclose(got_span[0], want_span, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(got_vocab[0], want_vocab, rtol=1e-4, atol=1e-6)
  # Equal span probabilities give zero; the gradient through the clipped form is finite.
  value, grad = jax.jit(jax.value_and_grad(xtok.span_kl, argnums=(0, 1)))(
      jnp.float32(-0.3), jnp.float32(-0.3))
  np.testing.assert_allclose((value, *grad), 0.0, atol=1e-6)
  # A certain span (P = 1) is clipped: finite value and gradient.
  value, grad = jax.jit(jax.value_and_grad(xtok.span_kl, argnums=1))(jnp.float32(-2.0),
                                                                      jnp.float32(0.0))
  assert np.isfinite(value) and np.isfinite(grad)


# ------------------------------------------------------------------ the method in a run


@pytest.fixture(scope='module')
def qwen_teacher(tmp_path_factory, qwen_style):
  """A random tiny teacher over the qwen-style vocabulary, exported as a teacher run does."""
  from distill.models import get_preset, sharded
  from distill.parallel import mesh as mesh_lib
  from distill.train import teacher as teacher_lib
  workdir = str(tmp_path_factory.mktemp('teacher'))
  config = get_preset('tiny', vocab_size=qwen_style.vocab_size)
  teacher_lib.export_final(workdir, config, sharded.init_params(
      config, jax.random.PRNGKey(1), mesh_lib.make_mesh({'data': 1})))
  return workdir


def _config(teacher_dir, tokenizer_dir, loss='uld'):
  from distill.train.config import base_config, make_small
  c = make_small(base_config())
  c.role, c.mesh.data, c.wandb.mode = 'student', 1, 'disabled'
  with c.unlocked():
    c.task.kwargs.num_digits = 2
    c.algorithm.kwargs.loss = loss
  c.data.batch_size, c.total_steps, c.checkpoint_steps, c.log_steps = 4, 2, 2, 1
  c.eval.generate, c.data.eval_batch_size = False, 4
  c.teacher.checkpoint, c.teacher.tokenizer = teacher_dir, tokenizer_dir
  c.algorithm.name = 'cross_tokenizer'
  c.loss.kd_weight, c.loss.ce_weight = 1.0, 0.5
  return c


def test_teacher_tokenizer_only_for_cross_tokenizer_methods(qwen_teacher, qwen_style, tmp_path):
  from distill.train import run as run_lib
  from distill.train import trainer
  config = _config(qwen_teacher, '')
  with pytest.raises(ValueError, match="'cross_tokenizer' distils from a teacher with its own "
                                       'tokenizer: set config.teacher.tokenizer'):
    run_lib.build_run(config, str(tmp_path))
  config = _config(qwen_teacher, qwen_style.folder)
  config.algorithm.name = 'supervised'
  config.algorithm.kwargs = {}
  with pytest.raises(ValueError, match="teacher.tokenizer=.* is set, but algorithm 'supervised'"):
    run_lib.build_run(config, str(tmp_path))
  config.teacher.tokenizer = ''   # the vocabulary check still holds for every other method
  with pytest.raises(ValueError, match=r"vocabulary \(23\) != student vocabulary \(46\)"):
    run_lib.build_run(config, str(tmp_path))
  config = _config(qwen_teacher, qwen_style.folder, loss='kl')
  with pytest.raises(ValueError, match=r"kwargs.loss must be one of \['uld', 'gold'\]"):
    trainer.make_method(run_lib.build_run(config, str(tmp_path)))


@pytest.fixture(scope='module')
def objective_inputs(qwen_teacher, qwen_style, tmp_path_factory):
  """loss(kwargs_loss, chunk_size) -> (value, metrics) of the method's objective on one batch
  of a run's rows, with the batch and both models' full logits for the references."""
  from distill.algorithms import hooks
  from distill.models import sharded
  from distill.train import run as run_lib
  from distill.train import trainer
  from flax import nnx
  workdir = str(tmp_path_factory.mktemp('objective'))
  run = run_lib.build_run(_config(qwen_teacher, qwen_style.folder), workdir)
  batch = {k: jnp.asarray(v) for k, v in next(run_lib.train_iterator(run)).items()}
  graphdef, _ = sharded.abstract_model(run.model_config)
  params = sharded.init_params(run.model_config, jax.random.PRNGKey(0), run.mesh)

  def loss(kind, chunk_size):
    run.config.algorithm.kwargs.loss = kind
    method = trainer.make_method(run)
    inputs = hooks.StepInputs(params, run.teacher_params, {}, None, 0)
    drawn = method.rows.draw(None, inputs, batch)
    ctx = hooks.StepContext(graphdef, run.teacher_graphdef, None, None, chunk_size=chunk_size)
    return jax.jit(lambda p, t: method.objective.loss(ctx, p, None, t, drawn, {}))(
        params, run.teacher_params)

  @jax.jit
  def logits(student_params, teacher_params):
    student = nnx.merge(graphdef, student_params)(batch['tokens'], batch['input_mask'])
    teacher = nnx.merge(run.teacher_graphdef, teacher_params)(batch['teacher_tokens'],
                                                              batch['teacher_input_mask'])
    return (student[..., :run.tokenizer.vocab_size].astype(jnp.float32),
            teacher[..., :qwen_style.vocab_size].astype(jnp.float32))

  return loss, batch, logits(params, run.teacher_params), run


def test_uld_objective_aligns_completions_and_chunks(objective_inputs):
  """The objective's ULD is the formula at the columns both completions cover (the k-th
  completion position of each model), plus CE, chunked or not."""
  loss, batch, (student, teacher), _ = objective_inputs
  plain, metrics = loss('uld', 0)
  chunked, _ = loss('uld', 8)
  np.testing.assert_allclose(chunked, plain, rtol=1e-5)
  both = (batch['loss_mask'] != 0) & (batch['teacher_loss_mask'] != 0)
  assert both.sum() > 0
  ce = losses.cross_entropy(student, batch['targets'], batch['loss_mask'])
  want = (xtok.uld(student, teacher, both).sum() + 0.5 * ce.sum()) / batch['loss_mask'].sum()
  np.testing.assert_allclose(plain, want, rtol=1e-5)
  assert metrics['tokens'][0] == batch['loss_mask'].sum()


def test_gold_objective_weights_spans_like_their_first_token(objective_inputs, qwen_style):
  """Σ over spans of (span KL + forward KL over the shared ids), each span counted once like
  its first student token, plus CE, over the student's completion tokens."""
  loss, batch, (student, teacher), run = objective_inputs
  value, metrics = loss('gold', 0)
  student_ids, teacher_ids = alignment.shared_vocabulary(run.tokenizer, qwen_style)
  spans, vocab, mask, _ = xtok.span_terms(
      student, teacher, batch, num_spans=student.shape[1],
      vocab_divergence=losses.get('forward_kl'), student_ids_K=student_ids,
      teacher_ids_K=teacher_ids)
  ce = losses.cross_entropy(student, batch['targets'], batch['loss_mask'])
  want = ((spans + vocab).sum() + 0.5 * ce.sum()) / batch['loss_mask'].sum()
  np.testing.assert_allclose(value, want, rtol=1e-5)
  # Every row's completion is at least its EOS span; the char student has a span per token
  # wherever qwen-style's only merge ('34') does not occur.
  assert batch['span_ids'].max(1).min() >= 1 and metrics['spans'][0] == mask.sum()
  np.testing.assert_allclose(metrics['span_kl'][0], spans.sum(), rtol=1e-5)


# ------------------------------------------------------------------ a served teacher


@pytest.fixture(scope='module')
def qwen_server(qwen_teacher, qwen_style):
  """The qwen-style teacher behind distill.serve on loopback (its own tokenizer)."""
  from distill.serve.engine import Engine
  from tests.test_serve import start
  server = start(Engine(qwen_teacher, tokenizer=qwen_style.folder), max_logprobs=32)
  yield server
  server.stop()


def _served_config(qwen_style, url, **kwargs):
  from tests.test_serve import FAST_RETRIES
  config = _config('', qwen_style.folder, loss='gold')
  config.teacher.server = url
  config.teacher.client.update(FAST_RETRIES)
  with config.unlocked():
    config.algorithm.kwargs.update(kwargs)
  return config


def test_served_gold_span_term_equals_the_in_process_teachers(objective_inputs, qwen_server,
                                                              qwen_style, tmp_path):
  """The server scores the teacher-layout rows ahead of the step; the span term and CE from
  its log-probs equal the float formula on the in-process teacher's logits."""
  from distill.algorithms import hooks
  from distill.models import sharded
  from distill.train import run as run_lib
  from distill.train import trainer
  _, batch, (student, teacher), _ = objective_inputs
  run = run_lib.build_run(_served_config(qwen_style, qwen_server.url, vocab_weight=0.0),
                          str(tmp_path))
  method = trainer.make_method(run)
  served_batch = next(method.train_batches(run_lib.train_iterator(run)))
  for field in ('tokens', 'teacher_tokens', 'span_ids', 'teacher_span_ids'):
    np.testing.assert_array_equal(served_batch[field], batch[field])   # the same first batch
  graphdef, _ = sharded.abstract_model(run.model_config)
  params = sharded.init_params(run.model_config, jax.random.PRNGKey(0), run.mesh)
  drawn = method.rows.draw(None, hooks.StepInputs(params, None, {}, None, 0),
                           {k: jnp.asarray(v) for k, v in served_batch.items()})
  ctx = hooks.StepContext(graphdef, None, None, None, chunk_size=0)
  value, metrics = jax.jit(lambda p: method.objective.loss(ctx, p, None, None, drawn, {}))(params)
  spans, vocab, mask, _ = xtok.span_terms(student, teacher, batch, num_spans=student.shape[1])
  assert vocab is None and mask.sum() > 0
  ce = losses.cross_entropy(student, batch['targets'], batch['loss_mask'])
  want = (spans.sum() + 0.5 * ce.sum()) / batch['loss_mask'].sum()
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['span_kl'][0], spans.sum(), rtol=1e-5)


def test_served_uld_at_k_v_minus_1_equals_the_in_process_teachers(objective_inputs, qwen_server,
                                                                   qwen_style, tmp_path):
  """ULD from the served top-k with the tail as one entry, at k = V_teacher − 1, equals the
  in-process objective on the same batch."""
  from distill.algorithms import hooks
  from distill.models import sharded
  from distill.train import run as run_lib
  from distill.train import trainer
  loss, batch, _, _ = objective_inputs
  in_process, _ = loss('uld', 0)
  run = run_lib.build_run(_served_config(qwen_style, qwen_server.url, loss='uld',
                                         k=qwen_style.vocab_size - 1), str(tmp_path))
  method = trainer.make_method(run)
  served_batch = next(method.train_batches(run_lib.train_iterator(run)))
  np.testing.assert_array_equal(served_batch['teacher_tokens'], batch['teacher_tokens'])
  graphdef, _ = sharded.abstract_model(run.model_config)
  params = sharded.init_params(run.model_config, jax.random.PRNGKey(0), run.mesh)
  drawn = method.rows.draw(None, hooks.StepInputs(params, None, {}, None, 0),
                           {k: jnp.asarray(v) for k, v in served_batch.items()})
  # Chunked (the served top-k goes a chunk at a time), against the unchunked in-process value
  # (chunked == unchunked in process: test_uld_objective_aligns_completions_and_chunks).
  ctx = hooks.StepContext(graphdef, None, None, None, chunk_size=8)
  served, _ = jax.jit(lambda p: method.objective.loss(ctx, p, None, None, drawn, {}))(params)
  np.testing.assert_allclose(served, in_process, rtol=1e-5)


@pytest.mark.parametrize('kwargs, problem', [
    ({'loss': 'uld'}, "kwargs.k must be ≥ 1 for kwargs.loss='uld' with a served teacher"),
    ({'vocab_weight': 0.0, 'k': 4}, "kwargs.k is unused by kwargs.loss='gold'"),
    ({}, r'kwargs.vocab_weight is not served \(it is 1.0\): the vocab term')])
def test_served_cross_tokenizer_refuses_what_it_cannot_compute_exactly(
    qwen_server, qwen_style, tmp_path, kwargs, problem):
  from distill.train import run as run_lib
  from distill.train import trainer
  run = run_lib.build_run(_served_config(qwen_style, qwen_server.url, **kwargs), str(tmp_path))
  with pytest.raises(ValueError, match=problem):
    trainer.make_method(run)


def test_served_cross_tokenizer_checks_the_teachers_tokenizer(qwen_server, qwen_style,
                                                             tmp_path):
  """The server's tokenizer is compared with config.teacher.tokenizer, not the student's (the
  student's, characters, differs from the server's in every served test above)."""
  from distill.teacher_client import TeacherServerError
  from distill.train import run as run_lib
  from distill.train import trainer
  config = _served_config(qwen_style, qwen_server.url, vocab_weight=0.0)
  config.teacher.tokenizer = 'char'
  run = run_lib.build_run(config, str(tmp_path))
  served = re.escape(qwen_style.fingerprint())
  with pytest.raises(TeacherServerError, match=f'uses tokenizer {served}, this run uses '
                                               r'.* \(config.teacher.tokenizer\)'):
    trainer.make_method(run)
