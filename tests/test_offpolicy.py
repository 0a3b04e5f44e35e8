"""Off-policy regimes: SeqKD, cached/online top-k KD and hidden-state KD, step by step
against independent references, and from the CLI in small mode; bad kwargs refused by name.

The CLI runs start in the background when the module starts (subprocesses sharing a
persistent compilation cache, XLA's backend optimisation off: compile time dominates these
tiny runs) and their tests come last.
"""
import concurrent.futures
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from distill import algorithms, losses
from distill.algorithms import divergence, hidden_kd, hooks
from distill.data import teacher_cache
from distill.models import sharded
from distill.parallel import mesh as mesh_lib
from distill.train import optimizer as opt_lib
from distill.train import run as run_lib
from distill.train import step as step_lib
from distill.train import teacher as teacher_lib
from tests.helpers import read_metrics, run_cli, run_cli_killed, small_config
from tests.test_teacher_cache import export_random_teacher, random_params

COMMON = ['--config.mesh.data=1', '--config.eval.generate=False', '--config.log_steps=1']
SEQKD = ['--config=configs/arithmetic_seqkd.py:small', *COMMON, '--config.total_steps=4',
         '--config.checkpoint_steps=2', '--config.algorithm.kwargs.num_prompts=32',
         '--config.algorithm.kwargs.rows_per_shard=16']
# cached_teacher runs from the CLI in tests/test_sweep.py (a sweep of three students).
CLI_JOBS = {
    'seqkd': [SEQKD, SEQKD],   # the first is SIGKILLed once checkpoint 2 is written
    'hidden_kd': [['--config=configs/arithmetic_hidden_kd.py:small', *COMMON,
                   '--config.total_steps=3', '--config.model.d_model=16']],
}


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  return export_random_teacher(str(tmp_path_factory.mktemp('teacher')))


@pytest.fixture(scope='module', autouse=True)
def cli_jobs(request, tmp_path_factory, teacher_dir):
  """Starts every CLI job in the background: they run while the in-process tests do."""
  if not any('cli_runs' in item.fixturenames for item in request.session.items
             if item.module is request.module):
    yield {}   # no CLI test selected
    return
  root = tmp_path_factory.mktemp('cli')

  def job(name):
    workdir, outputs = str(root / name), []
    for i, args in enumerate(CLI_JOBS[name]):
      args = [*args, f'--config.teacher.checkpoint={teacher_dir}']
      if name == 'seqkd' and i == 0:
        proc = run_cli_killed(workdir, *args, checkpoint_step=2)
        assert proc.returncode == -9, proc.stderr
      else:
        proc = run_cli(workdir, *args)
      outputs.append(proc.stdout)
    return workdir, outputs

  with concurrent.futures.ThreadPoolExecutor(len(CLI_JOBS)) as pool:
    yield {name: pool.submit(job, name) for name in CLI_JOBS}


@pytest.fixture(scope='module')
def cli_runs(cli_jobs):
  """{job: (workdir, [stdout of each command])} once every CLI job has finished."""
  return {name: future.result() for name, future in cli_jobs.items()}


def _train_rows(workdir):
  return [r for r in read_metrics(workdir) if 'loss' in r]


# ---------------------------------------------------------------------- steps vs references


@pytest.fixture(scope='module')
def run(teacher_dir, tmp_path_factory):
  """A tiny run whose student (width 16) is narrower than its teacher (32)."""
  config = small_config('arithmetic_hidden_kd')
  config.teacher.checkpoint = teacher_dir
  config.mesh.data = 1
  config.model.d_model = 16
  return run_lib.build_run(config, str(tmp_path_factory.mktemp('run')))


@pytest.fixture(scope='module')
def initial(run):
  """(state without algorithm state, ctx) in the trainer's layout, shared by the steps."""
  optimizer = opt_lib.make_optimizer(run.config)
  params = random_params(run.model_config, seed=0)
  state = {'step': np.int32(0), 'rng': np.zeros(2, np.uint32), 'params': params,
           'opt_state': jax.jit(optimizer.init)(params)}
  graphdef = sharded.abstract_model(run.model_config)[0]
  return state, hooks.StepContext(graphdef, run.teacher_graphdef, optimizer,
                                  divergence.make_token_fn(run.config, True))


@pytest.fixture(scope='module')
def batch(run):
  return next(run_lib.train_iterator(run))


def _algorithm(run, name, **kwargs):
  config = run.config.copy_and_resolve_references()
  config.algorithm.name = name
  config.algorithm.kwargs = kwargs
  method = algorithms.Method(algorithms.get(name), config, run)
  method.validate()
  return method


def _one_step(run, method, batch, initial):
  """(metrics, state) after one step of `method` from the shared initial state."""
  state, ctx = initial
  state = dict(state, algo=jax.jit(lambda: method.init_state(ctx.optimizer))())
  state, metrics = jax.jit(step_lib.build_step(ctx, method))(state, run.teacher_params, batch)
  return jax.device_get(metrics), state


def test_cached_online_and_supervised_agree(run, initial, tmp_path):
  """One step from the cache equals one step with the teacher's top-k computed online; at
  k = V with the tail bucket both are the full forward KL, i.e. supervised KD's step."""
  V = run.model_config.vocab_size
  cached = _algorithm(run, 'cached_teacher', k=V, num_rows=16, batch_size=16,
                      cache_dir=str(tmp_path))
  batch = next(cached.train_batches(None))
  rows = {k: batch[k] for k in hooks.ROW_KEYS}
  steps = [_one_step(run, cached, batch, initial),
           _one_step(run, _algorithm(run, 'topk_online', k=V), rows, initial),
           _one_step(run, _algorithm(run, 'supervised'), rows, initial)]
  (m_cached, s_cached), (m_online, _), (m_supervised, _) = steps
  np.testing.assert_allclose(np.divide(*m_cached['topk_mass']), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.divide(*m_cached['topk_mass']),
                             np.divide(*m_online['topk_mass']), rtol=1e-6)
  for metrics, state in steps[1:]:
    np.testing.assert_allclose(np.divide(*metrics['loss']), np.divide(*m_cached['loss']),
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(s_cached['params'])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_hidden_kd_step_against_references(run, initial, batch):
  """The logit part is supervised KD's loss; the hidden part is 1 − cosine through the
  projections, computed in numpy from the models' layer outputs."""
  method = _algorithm(run, 'hidden_kd', weight=2.0, layer_map='0:1,1:1', kind='cosine')
  start, ctx = initial
  projections = jax.device_get(jax.jit(method.objective.init_trainable)())
  supervised = divergence.Divergence(run.config, run, {})

  @jax.jit
  def references(params):
    layers = [nnx.merge(g, p).hidden_states(batch['tokens'], batch['input_mask'],
                                            return_layers=True)[1]
              for g, p in ((ctx.student_graphdef, params),
                           (run.teacher_graphdef, run.teacher_params))]
    drawn = hooks.Drawn(batch, {}, {})
    return layers, supervised.loss(ctx, params, None, run.teacher_params, drawn, {})[0]

  (s_layers, t_layers), logit_loss = jax.device_get(references(start['params']))
  mask = batch['loss_mask'] > 0
  distances = []
  for s, t in ((0, 1), (1, 1)):
    x = s_layers[s].astype(np.float64) @ projections[str(s)].astype(np.float64)
    y = t_layers[t].astype(np.float64)
    distances.append(1 - (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1))
  hidden_loss = np.mean([d[mask] for d in distances])

  metrics, state = _one_step(run, method, batch, initial)
  np.testing.assert_allclose(np.divide(*metrics['hidden_loss']), hidden_loss, rtol=1e-4)
  np.testing.assert_allclose(np.divide(*metrics['logit_loss']), logit_loss, rtol=1e-5)
  np.testing.assert_allclose(np.divide(*metrics['loss']), logit_loss + 2.0 * hidden_loss, rtol=1e-4)
  assert jax.tree.map(np.shape, state['algo']['trainable']['params']) == {'0': (16, 32),
                                                                          '1': (16, 32)}


def test_default_layer_map_and_parsing():
  assert hidden_kd.default_layer_map(2, 4) == {0: 1, 1: 3}
  assert hidden_kd.default_layer_map(3, 12) == {0: 3, 1: 7, 2: 11}
  assert hidden_kd.default_layer_map(2, 2) == {0: 0, 1: 1}
  assert hidden_kd.parse_layer_map('0:1, 1:3') == {0: 1, 1: 3}
  assert hidden_kd.parse_layer_map({'0': 2, 1: '3'}) == {0: 2, 1: 3}


# ---------------------------------------------------------------------- bad input


BAD = [
    ('cached_teacher', {'k': 0}, 'k must be an int >= 1'),
    ('cached_teacher', {'k': 1000}, 'k must be at most the vocabulary size'),
    ('cached_teacher', {'tail': 'drop'}, 'tail must be one of'),
    ('cached_teacher', {'logprob_dtype': 'bfloat16'}, 'logprob_dtype must be float32 or float16'),
    ('cached_teacher', {'num_rows': 10**9}, 'needs 1000000000 train examples'),
    ('cached_teacher', {'rows_per_shard': 0}, 'rows_per_shard must be an int >= 1'),
    ('cached_teacher', {'kk': 3}, "does not take kwargs ['kk']"),
    ('topk_online', {'num_rows': 3}, "does not take kwargs ['num_rows']"),
    ('seqkd', {'temperature': -1.0}, 'temperature must be a finite number >= 0'),
    ('seqkd', {'num_prompts': 0}, 'num_prompts must be an int >= 1'),
    ('hidden_kd', {'layer_map': '0:5'}, 'pair 0:5 is out of range'),
    ('hidden_kd', {'layer_map': '0-1'}, "expected 'S:T,S:T'"),
    ('hidden_kd', {'kind': 'l1'}, 'kind must be one of'),
    ('hidden_kd', {'weight': -1.0}, 'weight must be a number >= 0'),
]


@pytest.mark.parametrize('name,kwargs,message', BAD)
def test_bad_kwargs_are_refused_by_name(run, name, kwargs, message):
  with pytest.raises(ValueError) as error:
    _algorithm(run, name, **kwargs)
  assert message in str(error.value), error.value


def test_cached_teacher_needs_forward_kl(run):
  config = run.config.copy_and_resolve_references()
  config.algorithm.name, config.algorithm.kwargs = 'cached_teacher', {}
  config.loss.divergence = 'jsd'
  with pytest.raises(ValueError, match='minimises forward_kl, not config.loss.divergence'):
    algorithms.Method(algorithms.get('cached_teacher'), config, run).validate()


# ---------------------------------------------------------------------- CLI, small mode


def test_seqkd_data_is_written_once_and_reused_on_resume(cli_runs):
  workdir, (killed, resumed) = cli_runs['seqkd']
  assert 'seqkd data: wrote 32 rows' in killed
  assert 'seqkd data: reusing 32 rows' in resumed and 'seqkd data: wrote' not in resumed
  manifest = teacher_cache.read_manifest(os.path.join(workdir, 'seqkd'))
  assert manifest['complete'] and manifest['rows_computed'] == 32 and manifest['num_shards'] == 2
  assert [r['step'] for r in _train_rows(workdir)] == [1, 2, 3, 4]
  assert os.path.exists(os.path.join(workdir, 'final_metrics.json'))


def _greedy_reference(graphdef, params, prompt_P, mask_P, n_new, eos_id):
  """Greedy completion by full forward passes (no KV cache): an independent decoder."""
  forward = jax.jit(lambda t, m: nnx.merge(graphdef, params)(t, m))
  P = len(prompt_P)
  tokens, mask = np.zeros(P + n_new, np.int32), np.zeros(P + n_new, np.int32)
  tokens[:P], mask[:P] = prompt_P, mask_P
  for n in range(n_new):   # causal: later (unwritten) columns cannot change column P-1+n
    logits = np.asarray(forward(tokens[None], mask[None])[0, P - 1 + n])
    tokens[P + n], mask[P + n] = int(np.argmax(logits)), 1
    if tokens[P + n] == eos_id:
      break
  return tokens[P:], mask[P:]


def test_seqkd_rows_are_the_teachers_greedy_completions(cli_runs, teacher_dir):
  workdir, _ = cli_runs['seqkd']
  config = json.load(open(os.path.join(workdir, 'config.json')))
  P, N = config['task']['prompt_len'], config['task']['completion_len']
  source = teacher_cache.RowSource(os.path.join(workdir, 'seqkd'))
  graphdef, params, _ = teacher_lib.load_exported(teacher_dir, mesh_lib.make_mesh({'data': 1}))
  for i in (0, 17):
    row = source[i]
    tokens, mask = _greedy_reference(graphdef, params, row['tokens'][:P], row['input_mask'][:P],
                                     N, eos_id=2)
    np.testing.assert_array_equal(row['tokens'][P:] * row['input_mask'][P:], tokens * mask)
    np.testing.assert_array_equal(row['input_mask'][P:], mask)
    # Loss on every generated token (their targets sit one column earlier), nowhere else.
    np.testing.assert_array_equal(row['loss_mask'][P - 1:P - 1 + N], mask)
    assert row['loss_mask'][:P - 1].sum() == 0
    np.testing.assert_array_equal(row['targets'][:-1], row['tokens'][1:])


def test_hidden_kd_from_cli_trains_and_checkpoints_projections(cli_runs):
  workdir, _ = cli_runs['hidden_kd']
  rows = _train_rows(workdir)
  assert rows   # the loop below checks nothing if no train row was logged
  for r in rows:
    assert r['loss'] == pytest.approx(r['logit_loss'] + r['hidden_loss'], rel=1e-5)
    assert 0 < r['hidden_loss'] < 2   # 1 − cosine
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '3', 'state'))
  projections = state['algo']['trainable']['params']
  initial = jax.jit(lambda: losses.init_hidden_projections(
      jax.random.fold_in(jax.random.PRNGKey(0), 1), {0: 0, 1: 1}, 16, 32))()
  assert sorted(projections) == ['0', '1']
  for name, kernel in projections.items():
    assert kernel.shape == (16, 32)
    assert not np.allclose(kernel, initial[name])   # trained, not just carried
  assert json.load(open(os.path.join(workdir, 'model.json')))['d_model'] == 16
