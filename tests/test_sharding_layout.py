"""The layout a step is traced under (distill.parallel.activations): activations constrained at
the layer boundaries by the run's rules, the remat policy; and every method's step under the
2x2x2 mesh with accumulation. The losses under every layout: tests/test_sharding.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from distill import algorithms
from distill.models import layers, sharded
from distill.parallel import activations
from distill.parallel import mesh as mesh_lib
from distill.sweep import plan
from distill.train import config as config_lib
from distill.train import run as run_lib
from tests import sharding_runs
from tests.helpers import small_config

MODEL = sharding_runs.STUDENT    # its params made once per process (sharding_runs.host_params)
# XLA's backend optimisation off: these programs are tiny, compiling them dominates.
FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _hidden_states(params, tokens_BxT):
  return nnx.merge(sharded.abstract_model(MODEL)[0], params).hidden_states(tokens_BxT)


def test_residual_stream_is_constrained_by_the_rules_between_layers():
  mesh = mesh_lib.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  # The residual's embedding dimension over 'tensor': a layout XLA would not pick by itself.
  rules = mesh_lib.rules_with({'embed': 'tensor'})
  params = sharding_runs.placed(MODEL, 0, mesh, rules)
  tokens_BxT = np.arange(96).reshape(8, 12) % MODEL.vocab_size
  laid_out = jax.jit(activations.traced_under(activations.Layout(mesh, rules), _hidden_states))
  lowered = laid_out.lower(params, tokens_BxT)
  spec = '[{"data", "fsdp"}, {}, {"tensor"}]> : tensor<8x12x32xf32>'
  # After the embedding, at the end of the scanned layer body, after the final norm.
  assert lowered.as_text().count(spec) == 3, lowered.as_text()
  h_BxTxD = lowered.compile(FAST)(params, tokens_BxT)
  assert h_BxTxD.sharding.is_equivalent_to(
      NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor')), 3), h_BxTxD.sharding
  # The values of one device (the losses of whole steps: tests/test_sharding.py).
  single = jax.device_put(params, jax.devices()[0])
  plain = jax.jit(_hidden_states).lower(single, tokens_BxT)
  assert 'sharding_constraint' not in plain.as_text()    # outside a layout: no constraints
  plain = plain.compile(FAST)(single, tokens_BxT)
  np.testing.assert_allclose(h_BxTxD, plain, rtol=1e-5, atol=1e-6)


def _loss(params, tokens_BxT):
  return jnp.mean(_hidden_states(params, tokens_BxT) ** 2)


def _policy_in_force(fn, *args):
  """The jax.checkpoint policy of the layer body in fn's trace."""
  def policies(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'remat2':
        yield eqn.params['policy']
      for value in eqn.params.values():
        inner = getattr(value, 'jaxpr', value)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from policies(inner)
  # A fresh function each time: JAX caches a function's trace by its identity, not the layout.
  return list(policies(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr))


def test_every_remat_policy_gives_the_same_loss_and_gradient():
  params = sharding_runs.host_params(MODEL, 0)
  tokens_BxT = np.arange(16).reshape(2, 8) % MODEL.vocab_size

  def under_each_policy(params, tokens_BxT):   # one program for all: one compilation
    out = {}
    for name, policy in layers.REMAT_POLICIES.items():
      with activations.laid_out(activations.Layout(remat=name)):
        assert _policy_in_force(_loss, params, tokens_BxT) == [policy], name
        out[name] = jax.value_and_grad(_loss)(params, tokens_BxT)
    return out

  results = jax.jit(under_each_policy).lower(params, tokens_BxT).compile(FAST)(params,
                                                                              tokens_BxT)
  for name, result in results.items():
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name),
                 result, results['named'])
  # Outside a layout the model's own flag decides, as before the policies existed.
  assert _policy_in_force(_loss, params, tokens_BxT) == [layers.SAVED_FOR_BACKWARD]


def test_remat_policy_is_checked_and_is_no_part_of_a_runs_identity():
  config = small_config('arithmetic_student', 'small,scratch')
  config.model.remat_policy = 'dot'
  with pytest.raises(ValueError, match="remat_policy: unknown 'dot'; valid: none, named"):
    config_lib.validate(config)
  config.model.remat_policy = 'full'
  assert 'remat_policy' not in config_lib.model_overrides(config)
  # A finished run of the default policy is the same run under another (sweeps skip it).
  saved = plan.flat_config(small_config('arithmetic_student', 'small,scratch'))
  assert plan.config_differences(config, saved) == []


def _abstract_batch(run, method):
  """The step's batch as shapes (the task's first rows)."""
  rows = next(run_lib.train_iterator(run))
  return {f: jax.ShapeDtypeStruct(rows[f].shape, rows[f].dtype) for f in method.rows.fields}


def test_every_method_has_a_run_in_the_sharding_checks():
  assert sorted(sharding_runs.METHODS) == algorithms.names()


def test_a_sampling_method_lowers_under_the_mixed_layout_with_accumulation():
  """minillm (teacher-mixed sampling: both models' KV caches and logits constrained; the
  teacher's scores prepared outside the gradient; the samples cut into micro-batches) under
  2x2x2 with accumulation. Every method's losses under every layout, with accumulation too:
  experiments/sharding_matrix (lowering each here would cost the suite ~4 s a method)."""
  config = sharding_runs.make_config('minillm', {'data': 2, 'fsdp': 2, 'tensor': 2},
                                     grad_accum_steps=2)
  run, method, state, step_fn = sharding_runs.build(config)
  text = step_fn.lower(state, run.teacher_params, _abstract_batch(run, method)).as_text()
  # The student's residual stream in a micro-batch ([B / 2, T, D]) under its rules.
  B, T = config.data.batch_size // 2, run.seq_len
  assert f'[{{"data", "fsdp"}}, {{}}, {{}}]> : tensor<{B}x{T}x32xf32>' in text, text[:2000]
