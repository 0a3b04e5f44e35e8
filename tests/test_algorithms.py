"""On-policy methods and TAID: their pieces against independent references, every one from
the CLI in small mode, GKD's λ over many steps, DistiLLM and TAID resumed after SIGKILL, bad
input.

The CLI runs start together (subprocesses sharing a persistent compilation cache, with
XLA's backend optimisation off: compile time dominates these tiny runs) and each test
checks its own run.
"""
import concurrent.futures
import dataclasses
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from distill import sampling
from distill.algorithms import distillm, hooks, minillm, policy_gradient
from distill.train import run as run_lib
from distill.train import trainer
from tests.helpers import read_metrics, run_cli, run_cli_killed, small_config

COMMON = ['--config.mesh.data=1', '--config.eval.generate=False', '--config.data.eval_batch_size=4']
LAMBDA, LAMBDA_STEPS = 0.3, 200
# DistiLLM: φ grows by 0.5 at every evaluation (each step) after the first (eps < 0), so by
# the kill once checkpoint 4 is written the buffer has filled, and the steps redone after
# the resume replay from it.
KILL_AT, DISTILLM_STEPS = 4, 7
DISTILLM = ['--config=configs/arithmetic_distillm.py:small', *COMMON,
            f'--config.total_steps={DISTILLM_STEPS}', '--config.checkpoint_steps=2',
            '--config.eval_steps=1', '--config.log_steps=1',
            '--config.data.batch_size=4', '--config.algorithm.kwargs.capacity=8',
            '--config.algorithm.kwargs.loss_eps=-1e9',
            '--config.algorithm.kwargs.threshold_step=0.5']
TAID = ['--config=configs/arithmetic_taid.py:small', *COMMON, '--config.total_steps=7',
        '--config.checkpoint_steps=2', '--config.log_steps=1',
        '--config.algorithm.kwargs.alpha=0.5']   # a large step: t moves visibly each step
SHORT = [*COMMON, '--config.total_steps=2', '--config.checkpoint_steps=2', '--config.log_steps=1']
CLI_JOBS = {
    'gkd': [['--config=configs/arithmetic_gkd.py:small', *COMMON, '--config.data.batch_size=2',
             f'--config.total_steps={LAMBDA_STEPS}', f'--config.log_steps={LAMBDA_STEPS}',
             f'--config.checkpoint_steps={LAMBDA_STEPS}',
             f'--config.algorithm.kwargs.lmbda={LAMBDA}']],
    'minillm': [['--config=configs/arithmetic_minillm.py:small', *SHORT]],
    'onpolicy_rkl': [['--config=configs/arithmetic_onpolicy_rkl.py:small', *SHORT]],
    'skd': [['--config=configs/arithmetic_skd.py:small', *SHORT]],
    'distillm': [DISTILLM],
    'distillm_resumed': [DISTILLM, DISTILLM],   # the first is SIGKILLed at checkpoint KILL_AT
    'taid': [TAID],
    'taid_resumed': [TAID, TAID],
}
RESUMED = ('distillm_resumed', 'taid_resumed')


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A random tiny teacher, exported the way a teacher run exports (no training needed)."""
  from distill.data.tokenizer import CharTokenizer
  from distill.models import get_preset
  from distill.parallel import mesh as mesh_lib
  from distill.models import sharded
  from distill.train import teacher as teacher_lib
  workdir = str(tmp_path_factory.mktemp('teacher'))
  config = get_preset('tiny', vocab_size=CharTokenizer().vocab_size)
  params = sharded.init_params(config, jax.random.PRNGKey(1), mesh_lib.make_mesh({'data': 1}))
  teacher_lib.export_final(workdir, config, params)
  return workdir


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory, teacher_dir):
  """{job: workdir}: every CLI job of CLI_JOBS, run concurrently."""
  root = tmp_path_factory.mktemp('cli')

  def job(name):
    workdir = str(root / name)
    for i, args in enumerate(CLI_JOBS[name]):
      args = [*args, f'--config.teacher.checkpoint={teacher_dir}']
      if name in RESUMED and i == 0:
        killed = run_cli_killed(workdir, *args, checkpoint_step=KILL_AT)
        assert killed.returncode == -9, killed.stderr
      else:
        run_cli(workdir, *args)
    return workdir

  with concurrent.futures.ThreadPoolExecutor(len(CLI_JOBS)) as pool:
    return dict(zip(CLI_JOBS, pool.map(job, CLI_JOBS)))


def _train_rows(workdir):
  return [r for r in read_metrics(workdir) if 'loss' in r]


# ---------------------------------------------------------------------- CLI, small mode


def test_gkd_lambda_fraction_over_many_steps(cli_runs):
  """The coin is drawn per step from the step rng: over 200 steps it lands on λ."""
  rows = _train_rows(cli_runs['gkd'])
  assert len(rows) == 1 and rows[0]['step'] == LAMBDA_STEPS
  fraction = rows[0]['on_policy']
  bound = 4 * math.sqrt(LAMBDA * (1 - LAMBDA) / LAMBDA_STEPS)   # 4 binomial s.d.
  assert abs(fraction - LAMBDA) < bound, fraction
  assert math.isfinite(rows[0]['loss'])


def test_onpolicy_rkl_from_cli(cli_runs):
  rows = _train_rows(cli_runs['onpolicy_rkl'])
  assert [r['step'] for r in rows] == [1, 2]
  for r in rows:
    # Same parameters, temperature 1: the sampler's log-probs are the model's, so the
    # importance ratio is 1 (the decode cache and the full forward agree) and the loss
    # −Σ ratio·A equals the sampled reverse-KL estimate.
    assert r['ratio'] == pytest.approx(1.0, abs=1e-4)
    assert r['loss'] == pytest.approx(r['reverse_kl_estimate'], rel=1e-3, abs=1e-6)
    assert r['sample_length'] >= 1
  assert os.path.exists(os.path.join(cli_runs['onpolicy_rkl'], 'final_metrics.json'))


def test_minillm_from_cli(cli_runs):
  rows = _train_rows(cli_runs['minillm'])
  assert [r['step'] for r in rows] == [1, 2]
  for r in rows:
    assert 0 < r['importance_weight'] <= 1 / (1 - 0.2) + 1e-6   # w = q / (0.2·p + 0.8·q)
    assert r['single_step'] >= 0 and math.isfinite(r['long_term'])
    assert r['loss'] == pytest.approx(r['single_step'] + r['long_term'], rel=1e-4, abs=1e-6)


def test_skd_from_cli(cli_runs):
  rows = _train_rows(cli_runs['skd'])
  assert [r['step'] for r in rows] == [1, 2]
  for r in rows:
    assert 0 <= r['replaced'] <= 1 and math.isfinite(r['loss'])


def _final_state(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step),
                                                         'state'))


def test_distillm_resumes_with_the_same_buffer_and_schedule(cli_runs):
  straight, resumed = cli_runs['distillm'], cli_runs['distillm_resumed']
  rows = _train_rows(straight)
  # The run is not trivial: φ rose, the buffer filled, and steps after the kill replayed it.
  assert rows[0]['sgo_probability'] == 0 and rows[-1]['sgo_probability'] == 1.0
  assert sum(r['source_replay'] for r in rows if r['step'] > 4) > 0
  assert sum(r['source_fresh'] for r in rows) >= 2
  a, b = _final_state(straight, DISTILLM_STEPS), _final_state(resumed, DISTILLM_STEPS)
  assert int(a['algo']['rows']['size']) == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'tokens_per_s'} for r in rs]
  assert strip(read_metrics(straight)) == strip(read_metrics(resumed))


def test_taid_moves_t_and_resumes_exactly(cli_runs):
  straight, resumed = cli_runs['taid'], cli_runs['taid_resumed']
  t = [r['taid_t'] for r in _train_rows(straight)]
  assert len(t) == 7 and t[0] == pytest.approx(0.4)
  # The first update only records the loss; from then on the schedule pushes t up every step.
  assert t[1] == t[0] and all(b > a for a, b in zip(t[1:], t[2:])), t
  a, b = _final_state(straight, 7), _final_state(resumed, 7)
  assert float(a['algo']['objective']['t']) > t[-1]  # the state holds the next step's t
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'tokens_per_s'} for r in rs]
  assert strip(read_metrics(straight)) == strip(read_metrics(resumed))

# ---------------------------------------------------------------------- pieces vs references


def test_future_rewards_match_a_loop():
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(3, 7)).astype(np.float32)
  mask = np.array([[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]],
                  np.float32)
  for norm in (True, False):
    expected = np.zeros_like(rewards)
    for b in range(3):
      for t in range(7):
        future = [rewards[b, s] for s in range(t + 1, 7) if mask[b, s]]
        if future:
          expected[b, t] = np.mean(future) if norm else np.sum(future)
    got = minillm.future_rewards(jnp.asarray(rewards), jnp.asarray(mask), norm)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('chunk_size', [0, 5])
def test_target_logprobs_and_policy_gradient(chunk_size):
  """target_logprobs is log_softmax at the targets; the surrogate's gradient is that of
  −Σ ratio·A with ratio = q/q_sample (A constant), computed by autodiff on full logits."""
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  B, T, D, V = 2, 6, 4, 11
  h = jax.random.normal(k[0], (B, T, D))
  w = jax.random.normal(k[1], (D, V))
  targets = jax.random.randint(k[2], (B, T), 0, V)
  weights = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
  advantage = jax.random.normal(k[4], (B, T))
  log_sample = jnp.full((B, T), -2.0)
  ctx = hooks.StepContext(None, None, None, None, chunk_size=chunk_size)

  def reference_logq(h, w):
    return jnp.take_along_axis(jax.nn.log_softmax(h @ w), targets[..., None], -1)[..., 0]

  @jax.jit
  def compute(h, w):
    log_q = policy_gradient.target_logprobs(h, w, targets, chunk_size)
    coef = jnp.exp(log_q - log_sample) * advantage * weights
    surrogate = lambda h, w: policy_gradient.policy_gradient_loss(ctx, h, w, targets, coef)
    objective = lambda h, w: -jnp.sum(jnp.exp(reference_logq(h, w) - log_sample) * advantage
                                      * weights)
    return (log_q, reference_logq(h, w), jax.grad(surrogate, (0, 1))(h, w),
            jax.grad(objective, (0, 1))(h, w))

  log_q, expected, grads, expected_grads = compute(h, w)
  np.testing.assert_allclose(log_q, expected, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('chunk_size', [0, 4])
def test_soft_capped_models_are_distilled_on_their_capped_logits(chunk_size):
  """Gemma 2 caps its final logits: the objectives (which form logits from hidden states
  and the output projection) must see what each model's own forward pass gives."""
  from distill import losses
  from distill.algorithms import divergence
  from distill.models import get_preset, sharded
  from distill.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh({'data': 1})
  models = []
  for seed, cap in ((0, 0.5), (1, 0.3)):
    config = get_preset('tiny', vocab_size=13, max_seq_len=16, final_softcap=cap)
    models.append((sharded.abstract_model(config)[0],
                   sharded.init_params(config, jax.random.PRNGKey(seed), mesh)))
  (s_graph, s_params), (t_graph, t_params) = models
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 13)
  rows = {'tokens': tokens, 'targets': jnp.roll(tokens, -1, axis=1),
          'input_mask': jnp.ones((2, 8), jnp.int32),
          'loss_mask': jnp.ones((2, 8), jnp.float32).at[:, :3].set(0)}
  ctx = hooks.StepContext(s_graph, t_graph, None, losses.token_objective('forward_kl'),
                          chunk_size=chunk_size, student_softcap=0.5, teacher_softcap=0.3)
  objective = divergence.Divergence(None, None, {})
  loss, _ = objective.loss(ctx, s_params, None, t_params, hooks.Drawn(rows, {}, {}), {})
  student = nnx.merge(s_graph, s_params)(tokens, rows['input_mask'])
  teacher = nnx.merge(t_graph, t_params)(tokens, rows['input_mask'])
  per_token = losses.get('forward_kl')(student, teacher, rows['loss_mask'])
  expected = per_token.sum() / rows['loss_mask'].sum()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert np.abs(student).max() < 0.5                   # the caps really bind
  uncapped = dataclasses.replace(ctx, student_softcap=0.0, teacher_softcap=0.0)
  without_caps = objective.loss(uncapped, s_params, None, t_params, hooks.Drawn(rows, {}, {}),
                                {})[0]
  assert abs(float(without_caps) / float(expected) - 1) > 0.05


def test_skd_replaces_proposals_outside_the_teacher_top_k():
  from distill.algorithms import skd
  algo = skd.InterleavedRows.__new__(skd.InterleavedRows)
  algo.sampling = sampling.SamplingConfig(max_new_tokens=1)
  big = 50.0
  student = jnp.array([[0, 0, 0, 0, big]] * 2)            # always proposes token 4
  teacher = jnp.array([[big, 4, 3, 2, 1],                  # token 4 ranks last: replaced by 0
                       [3, big, 2, 1, 4]])                 # token 4 ranks 2nd: kept for K >= 2
  for k, expected, replaced in ((1, [0, 1], [1, 1]), (2, [0, 4], [1, 0]), (5, [4, 4], [0, 0])):
    algo.options = {'top_k_teacher': k}
    rule = algo.rule()
    token, _, flag = jax.jit(lambda key: rule.choose(rule.noise(key, 2, 5), student, teacher))(
        jax.random.PRNGKey(k))
    np.testing.assert_array_equal(token, expected)
    np.testing.assert_array_equal(flag, replaced)


def test_distillm_schedule_after_eval():
  """Released-code semantics: the first evaluation sets the reference; a rise of ≥ eps over
  it adds threshold_step (capped at 1) and moves the reference; smaller changes do nothing."""
  rows = distillm.AdaptiveReplayRows.__new__(distillm.AdaptiveReplayRows)
  rows.options = dict(distillm.AdaptiveReplayRows.DEFAULTS, threshold_step=0.4)
  state = {'threshold': jnp.float32(0.0), 'reference_loss': jnp.float32(jnp.inf)}
  seen = []
  for loss in (2.0, 1.5, 2.05, 2.2, 1.0, 2.25, 2.4, 2.6):
    state = rows.after_eval(state, {'ce': loss})
    seen.append((float(state['threshold']), float(state['reference_loss'])))
  expected = [(0.0, 2.0), (0.0, 2.0), (0.0, 2.0), (0.4, 2.2), (0.4, 2.2), (0.4, 2.2), (0.8, 2.4),
              (1.0, 2.6)]
  np.testing.assert_allclose(seen, expected, rtol=1e-6)
  # "At least": a rise of exactly eps counts (2.0 -> 2.5 with eps 0.5, exact in binary).
  rows.options['loss_eps'] = 0.5
  state = {'threshold': jnp.float32(0.0), 'reference_loss': jnp.float32(jnp.inf)}
  for loss in (2.0, 2.5):
    state = rows.after_eval(state, {'ce': loss})
  assert (float(state['threshold']), float(state['reference_loss'])) == (pytest.approx(0.4), 2.5)


def test_distillm_fresh_sample_probability_follows_the_step_number():
  """φ_fresh at the t-th of T steps (t − 1 steps done before it): decreasing φ·(1 − t/T),
  constant φ/2, increasing φ·t/T."""
  rows = distillm.AdaptiveReplayRows.__new__(distillm.AdaptiveReplayRows)
  rows.config = types.SimpleNamespace(total_steps=10)
  for ratio, want in (('decreasing', 0.8 * (1 - 3 / 10)), ('constant', 0.4),
                      ('increasing', 0.8 * 3 / 10)):
    rows.options = dict(distillm.AdaptiveReplayRows.DEFAULTS, replay_ratio=ratio)
    got = rows._fresh_probability(jnp.float32(0.8), jnp.int32(2))
    assert float(got) == pytest.approx(want, rel=1e-6), ratio


def test_taid_linear_schedule_reaches_t_end_at_the_last_step():
  """With α = 0, t after the n-th of N steps is the floor t_start + (t_end − t_start)·n/N (the
  first step only records the loss): t_end once the last step is done."""
  from distill import losses
  from distill.algorithms import taid
  objective = taid.TAID.__new__(taid.TAID)
  objective.config = types.SimpleNamespace(total_steps=4)
  state = losses.taid_init(t_start=0.2, t_end=1.0, alpha=0.0)
  seen = []
  for done in range(4):   # steps done before this one, as the train step passes it
    state = objective.update_state(state, {'loss': (jnp.float32(2.0 - done), jnp.float32(1.0))},
                                   jnp.int32(done))
    seen.append(float(state['t']))
  np.testing.assert_allclose(seen, [0.2, 0.6, 0.8, 1.0], rtol=1e-6)

def test_distillm_fresh_rows_wrap_around_the_replay_ring():
  """Fresh rows go to slots next, next+1, ... modulo the capacity, which need not be a
  multiple of the batch: 4 rows written at next = 4 of a capacity of 6 land in slots 4, 5, 0
  and 1 (JAX would drop writes past the end without a word)."""
  from test_model import make_model
  graphdef, params = nnx.split(make_model())
  rows_hook = distillm.AdaptiveReplayRows.__new__(distillm.AdaptiveReplayRows)
  rows_hook.options = dict(distillm.AdaptiveReplayRows.DEFAULTS, capacity=6)
  rows_hook.config = types.SimpleNamespace(total_steps=10)
  rows_hook.sampling = sampling.SamplingConfig(max_new_tokens=3)
  B, T, C = 4, 8, 6
  tokens = jnp.arange(B * T, dtype=jnp.int32).reshape(B, T) % 30 + 1
  batch = {'tokens': tokens, 'targets': tokens, 'input_mask': jnp.ones((B, T), jnp.int32),
           'loss_mask': jnp.ones((B, T), jnp.float32)}
  buffer = {k: jnp.full((C, T), -1, v.dtype) for k, v in batch.items()}
  # φ = 1 and a buffer not yet full: this step samples fresh rows.
  state = {'threshold': jnp.float32(1.0), 'reference_loss': jnp.float32(1.0), 'buffer': buffer,
           'size': jnp.int32(2), 'next': jnp.int32(4)}
  inputs = hooks.StepInputs(params, None, state, jax.random.PRNGKey(0), jnp.int32(0))
  drawn = rows_hook.draw(types.SimpleNamespace(student_graphdef=graphdef), inputs, batch)
  assert float(drawn.metrics['source_fresh'][0]) == 1.0
  for k in batch:
    np.testing.assert_array_equal(drawn.state['buffer'][k][np.array([4, 5, 0, 1])],
                                  drawn.rows[k])
    np.testing.assert_array_equal(drawn.state['buffer'][k][2:4], buffer[k][2:4])
  assert int(drawn.state['size']) == 6 and int(drawn.state['next']) == 2

# ---------------------------------------------------------------------- bad input


BAD_KWARGS = [
    ('gkd', {'lmbda': 1.5}, 'lmbda must be a number in [0, 1]'),
    ('gkd', {'lmbda': -0.1}, 'lmbda must be a number in [0, 1]'),
    ('gkd', {'seq_kd': 'yes'}, 'seq_kd must be True or False'),
    ('gkd', {'temperature': -1.0}, 'temperature must be a finite number >= 0'),
    ('onpolicy_rkl', {'top_p': 0.0}, 'top_p must be in (0, 1]'),
    ('skd', {'top_k': -2}, 'top_k must be an int >= 0'),
    ('skd', {'top_k_teacher': 0}, 'top_k_teacher must be an int >= 1'),
    ('minillm', {'teacher_mix': 1.0}, 'teacher_mix must be in [0, 1)'),
    ('minillm', {'temperature': 0.0}, 'importance weights need a sampling distribution'),
    ('distillm', {'capacity': 4}, 'capacity must be an int >= config.data.batch_size'),
    ('distillm', {'replay_ratio': 'sometimes'}, 'replay_ratio must be one of'),
    ('gkd', {'lambda': 0.5}, "does not take kwargs ['lambda']"),
]


@pytest.mark.parametrize('name,kwargs,message', BAD_KWARGS)
def test_bad_kwargs_fail_before_compilation(name, kwargs, message, teacher_dir, tmp_path,
                                            monkeypatch):
  config = small_config(f'arithmetic_{name}')
  config.teacher.checkpoint = teacher_dir
  config.mesh.data = 1
  with config.unlocked():
    config.algorithm.kwargs.update(kwargs)

  def compiled(*args, **kw):
    raise AssertionError('the train state was built before the bad input was reported')

  monkeypatch.setattr(trainer.state_lib, 'create_train_state', compiled)
  with pytest.raises(ValueError) as error:
    trainer.train(config, str(tmp_path))
  assert message in str(error.value), error.value


def test_wrong_loss_and_missing_teacher_are_refused(teacher_dir, tmp_path):
  config = small_config('arithmetic_minillm')
  config.teacher.checkpoint = teacher_dir
  config.loss.divergence = 'forward_kl'
  run = run_lib.build_run(config, str(tmp_path))
  with pytest.raises(ValueError, match=r"minimises reverse_kl, not config.loss.divergence="
                                       r"'forward_kl': set it to one of \['reverse_kl'\]"):
    trainer.make_method(run)
  config = small_config('arithmetic_gkd')
  config.loss.kd_weight = 0.0
  config.loss.ce_weight = 1.0
  run = run_lib.build_run(config, str(tmp_path))
  with pytest.raises(ValueError, match='needs a teacher'):
    trainer.make_method(run)
