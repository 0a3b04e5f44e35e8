"""Several teachers (distill.algorithms.teachers): the mixed and routed objectives against
single-teacher computations and a float64 formula, the route field from a JSONL source to
the batch, and bad input refused by name before anything compiles."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill import teacher_pool
from distill.algorithms import divergence, hooks, teachers
from distill.data import pipeline
from distill.data.tokenizer import CharTokenizer
from distill.models import get_preset, sharded
from distill.train import config as config_lib
from distill.train import run as run_lib
from distill.train import monitor
from distill.train import teacher as teacher_lib

VOCAB = CharTokenizer().vocab_size
B, T = 4, 10


FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _random_params(abstract, seed):
  """Params drawn with numpy (no RNG program to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)


def _rows(seed=0):
  rng = np.random.default_rng(seed)
  loss_mask = (rng.random((B, T)) < 0.7).astype(np.float32)
  return {'tokens': rng.integers(3, VOCAB, (B, T), dtype=np.int32),
          'targets': rng.integers(3, VOCAB, (B, T), dtype=np.int32),
          'input_mask': np.ones((B, T), np.int32), 'loss_mask': loss_mask,
          teachers.ROUTE_FIELD: np.repeat(np.array([0, 1, 1, 0], np.int32)[:, None], T, 1)}


def _config(divergence_name='forward_kl', ce_weight=0.0, temperature=1.0):
  c = config_lib.base_config()
  c.loss.divergence, c.loss.ce_weight, c.loss.temperature = divergence_name, ce_weight, temperature
  return c


def _loss_fn(config, graphdef, teacher_graphdef, objective_cls, chunk_size):
  """(params, teacher params, rows) -> (loss, metrics) of one objective."""
  ctx = hooks.StepContext(student_graphdef=graphdef, teacher_graphdef=teacher_graphdef,
                          optimizer=None, token_fn=divergence.make_token_fn(config, True),
                          chunk_size=chunk_size)
  objective = objective_cls(config, types.SimpleNamespace(teacher_graphdef=teacher_graphdef), {})
  return lambda params, teacher_params, rows: objective.loss(
      ctx, params, None, teacher_params, hooks.Drawn(rows, {}, {}), {})


def _ensemble(graphdef, weights=()):
  return teachers.Ensemble(graphdefs=(graphdef, graphdef), names=('a', 'b'), softcaps=(0.0, 0.0),
                           weights=weights)


MIX = (0.3, 0.7)


@pytest.fixture(scope='module')
def computed():
  """Every objective of the tests below, evaluated in one compiled program (tiny models)."""
  graphdef, abstract = sharded.abstract_model(get_preset('tiny', vocab_size=VOCAB))
  student, teacher_a, teacher_b = (_random_params(abstract, seed) for seed in range(3))
  subsets = [dict(rows, loss_mask=np.where(rows[teachers.ROUTE_FIELD] == i, rows['loss_mask'], 0.0))
             for i, rows in enumerate([_rows()] * 2)]
  # Weights (1, 0): any divergence, CE and τ, through the chunked loss, with gradients.
  hinton = _config('jsd', ce_weight=0.5, temperature=2.0)
  grad_of = lambda fn: jax.value_and_grad(fn, has_aux=True)
  one_zero = grad_of(_loss_fn(hinton, graphdef, _ensemble(graphdef, (1.0, 0.0)),
                              teachers.MixedTeachers, 8))
  first_alone = grad_of(_loss_fn(hinton, graphdef, graphdef, divergence.Divergence, 8))
  # Routed, and mixed (0.3, 0.7): forward KL, plain loss.
  kl = _config()
  routed = _loss_fn(kl, graphdef, _ensemble(graphdef), teachers.MixedTeachers, 0)
  mixed = _loss_fn(kl, graphdef, _ensemble(graphdef, MIX), teachers.MixedTeachers, 0)
  single = _loss_fn(kl, graphdef, graphdef, divergence.Divergence, 0)
  logits = lambda params, rows: nnx.merge(graphdef, params)(rows['tokens'], rows['input_mask'])

  def everything(student, teacher_a, teacher_b, rows, subsets):
    both = (teacher_a, teacher_b)
    return {'one_zero': one_zero(student, both, rows), 'first': first_alone(student, teacher_a, rows),
            'routed': routed(student, both, rows),
            'singles': [single(student, t, s) for t, s in zip(both, subsets)],
            'mixed': mixed(student, both, rows)[0],
            'probe': monitor.probe(graphdef, _ensemble(graphdef, MIX), student, both, rows),
            'logits': [logits(p, rows) for p in (student, teacher_a, teacher_b)]}

  args = (student, teacher_a, teacher_b, _rows(), subsets)
  compiled = jax.jit(everything).lower(*args).compile(compiler_options=FAST_COMPILE)
  return jax.device_get(compiled(*args))


def _close(x, y, rtol):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-7), x, y)


def test_weights_one_zero_equal_the_first_teacher(computed):
  (loss, _), grad = computed['one_zero']
  (single, _), single_grad = computed['first']
  _close(loss, single, 1e-6)
  _close(grad, single_grad, 1e-5)


def test_routing_sends_each_row_to_its_teacher(computed):
  """The routed loss = the single-teacher losses on each teacher's rows, weighted by their
  tokens; teacher_kl/NAME is that teacher's KL on its rows."""
  loss, metrics = computed['routed']
  rows = _rows()
  tokens = (rows['loss_mask'] != 0).sum()
  total = 0.0
  for name, (part, part_metrics) in zip('ab', computed['singles']):
    total += part * part_metrics['tokens'][0] / tokens   # each single loss is its token mean
    kl_sum, kl_count = metrics[f'teacher_kl/{name}']
    assert kl_count == part_metrics['tokens'][0]
    _close(kl_sum / kl_count, part, 1e-5)   # forward KL alone: the single loss is the KL
  _close(loss, total, 1e-5)


def test_mixture_against_float64(computed):
  def logprobs(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  student, teacher_a, teacher_b = (logprobs(z) for z in computed['logits'])
  p = MIX[0] * np.exp(teacher_a) + MIX[1] * np.exp(teacher_b)
  kl = (p * (np.log(p) - student)).sum(-1)
  mask = _rows()['loss_mask']
  np.testing.assert_allclose(computed['mixed'], (kl * mask).sum() / mask.sum(), rtol=1e-5)


def test_monitor_probe_entropy_and_kl_to_the_mixture(computed):
  """The per-log probe: the student's entropy (vs float64) and its forward KL to the
  teachers' mixture, which is the mixed forward-KL loss on the same rows."""
  logits = np.asarray(computed['logits'][0], np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logprobs = z - np.log(np.exp(z).sum(-1, keepdims=True))
  entropy = -(np.exp(logprobs) * logprobs).sum(-1)
  mask = _rows()['loss_mask']
  (entropy_sum, count), (kl_sum, kl_count) = (computed['probe'][k] for k in
                                              ('student_entropy', 'probe_kl'))
  np.testing.assert_allclose(entropy_sum / count, (entropy * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(kl_sum / kl_count, computed['mixed'], rtol=1e-5)


def _export(path, vocab_size=VOCAB, tokenizer=''):
  model_config = get_preset('tiny', vocab_size=vocab_size)
  params = _random_params(sharded.abstract_model(model_config)[1], 0)
  teacher_lib.export_final(str(path), model_config, params)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'tokenizer': tokenizer}, f)
  return str(path)


@pytest.fixture(scope='module')
def routed_data(tmp_path_factory):
  root = tmp_path_factory.mktemp('routed')
  rows = [{'prompt': f'{i}+{i}=', 'completion': str(2 * i), 'teacher_route': route}
          for i, route in zip(range(12), ['math', 'text'] * 6)]
  with open(root / 'rows.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return root, rows


def _student_config(root, teacher_dirs, **teachers_fields):
  c = config_lib.base_config()
  c.task.name, c.task.prompt_len, c.task.completion_len = 'jsonl', 8, 4
  c.task.kwargs.path, c.task.kwargs.route_field = str(root / 'rows.jsonl'), 'teacher_route'
  c.mesh.data, c.data.batch_size, c.model.preset = 1, 4, 'tiny'
  c.teacher.checkpoint, c.teachers.more = teacher_dirs[0], tuple(teacher_dirs[1:])
  for name, value in teachers_fields.items():
    c.teachers[name] = value
  return c


@pytest.fixture(scope='module')
def teacher_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('teachers')
  return [_export(root / name) for name in ('math', 'text')]


def test_route_field_reaches_the_batch(routed_data, teacher_dirs, tmp_path):
  from distill.train import trainer
  root, rows = routed_data
  run = run_lib.build_run(_student_config(root, teacher_dirs, routes=('math', 'text')),
                          str(tmp_path))
  assert teachers.is_ensemble(run.teacher_graphdef) and run.teacher_graphdef.names == (
      'math', 'text')
  method = trainer.make_method(run)   # supervised: the dataset's rows, with their routes
  assert teachers.ROUTE_FIELD in method.rows.fields
  assert isinstance(method.objective, teachers.MixedTeachers)
  batch = next(run_lib.train_iterator(run))
  tokenizer = CharTokenizer()
  by_prompt = {r['prompt']: ('math', 'text').index(r['teacher_route']) for r in rows}
  for tokens, mask, route in zip(batch['tokens'], batch['input_mask'],
                                 batch[pipeline.ROUTE_FIELD]):
    prompt = tokenizer.decode(tokens[mask != 0][1:])   # without BOS
    prompt = prompt[:prompt.index('=') + 1]
    assert (route == by_prompt[prompt]).all()


@pytest.mark.parametrize('fields, message', [
    (dict(weights=(0.5, 0.6)), 'sum to 1.1, not 1'),
    (dict(weights=(1.0,)), 'has 1 values for 2 teachers'),
    (dict(weights=(0.5, 0.5), routes=('math', 'text')), 'either config.teachers.weights'),
    (dict(routes=('math', 'prose')), "routes rows to ['text'], which no teacher serves"),
])
def test_bad_teacher_settings(routed_data, teacher_dirs, tmp_path, fields, message):
  with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')
                     .replace('(', r'\(').replace(')', r'\)')):
    run_lib.build_run(_student_config(routed_data[0], teacher_dirs, **fields), str(tmp_path))


def test_teachers_must_share_vocabulary_and_tokenizer(routed_data, teacher_dirs, tmp_path):
  root = routed_data[0]
  other_vocab = _export(tmp_path / 'wide', vocab_size=VOCAB + 1)
  with pytest.raises(ValueError, match=f'vocabulary \\({VOCAB + 1}\\) != student'):
    run_lib.build_run(_student_config(root, [teacher_dirs[0], other_vocab], weights=(0.5, 0.5)),
                      str(tmp_path / 'a'))
  hf_folder = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf', 'llama')
  other_tokenizer = _export(tmp_path / 'other_tok', tokenizer=hf_folder)
  with pytest.raises(ValueError, match='another tokenizer than the run.s: vocab_size'):
    run_lib.build_run(_student_config(root, [teacher_dirs[0], other_tokenizer],
                                      weights=(0.5, 0.5)), str(tmp_path / 'b'))


def test_methods_that_run_the_teacher_are_refused(routed_data, teacher_dirs, tmp_path):
  from distill.train import trainer
  config = _student_config(routed_data[0], teacher_dirs, weights=(0.5, 0.5))
  config.algorithm.name = 'topk_online'
  with pytest.raises(ValueError, match="algorithm 'topk_online' minimises TopKForwardKL"):
    trainer.make_method(run_lib.build_run(config, str(tmp_path)))


def _dense_teachers(n: int, vocab: int, rows: int, seed: int):
  """[n, rows, V] float64 distributions, peaked enough that top-k cut real mass."""
  logits = 2.0 * np.random.default_rng(seed).standard_normal((n, rows, vocab))
  return np.exp(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))


@pytest.mark.parametrize('k', [4, 11])   # 11 = V - 1: one unlisted id per teacher
def test_served_topk_mixture_against_float64(k):
  """Several served teachers' top-k mixed (distill.teacher_pool.mix_topk): each union id's
  probability is Σ_i w_i p̃_i(v) with p̃_i teacher i's listed probability or its missing mass
  spread over its V - k unlisted ids; the bucket is the spread mass outside the union; at
  k = V - 1 that is the exact mixture."""
  vocab, rows, weights = 12, 20, (0.5, 0.3, 0.2)
  p_NxRxV = _dense_teachers(3, vocab, rows, seed=k)
  ids = [np.argsort(-p, axis=-1)[:, :k] for p in p_NxRxV]
  logprobs = [np.log(np.take_along_axis(p, i, -1)).astype(np.float32)
              for p, i in zip(p_NxRxV, ids)]
  got_ids, got_logprobs = teacher_pool.mix_topk(ids, logprobs, weights, vocab)
  assert got_ids.shape == got_logprobs.shape == (rows, 3 * k)
  for r in range(rows):
    spread_RxV = np.empty((3, vocab))
    for i in range(3):
      spread_RxV[i] = (1 - p_NxRxV[i, r, ids[i][r]].sum()) / (vocab - k)
      spread_RxV[i, ids[i][r]] = p_NxRxV[i, r, ids[i][r]]
    want_V = np.asarray(weights) @ spread_RxV
    union = sorted({int(v) for i in ids for v in i[r]})
    listed = got_logprobs[r] > -np.inf
    got = dict(zip(got_ids[r][listed].tolist(), np.exp(got_logprobs[r][listed].astype(np.float64))))
    first = int(listed.sum())   # the union's ids first, best first, then the repeats at -inf
    assert sorted(got) == union and listed[:first].all()
    assert (np.diff(got_logprobs[r][:first]) <= 0).all()
    np.testing.assert_allclose([got[v] for v in union], want_V[union], rtol=1e-5)
    outside = np.setdiff1d(np.arange(vocab), union)
    np.testing.assert_allclose(1 - sum(got.values()), want_V[outside].sum(), atol=1e-6)
    if k == vocab - 1:
      exact_V = np.asarray(weights) @ p_NxRxV[:, r]
      np.testing.assert_allclose([got[v] for v in union], exact_V[union], rtol=1e-5)
  tokens = [np.log(p[:, 0]).astype(np.float32) for p in p_NxRxV]
  np.testing.assert_allclose(teacher_pool.mix_token_logprobs(tokens, weights),
                             np.log(np.asarray(weights) @ p_NxRxV[:, :, 0]), rtol=1e-6)
