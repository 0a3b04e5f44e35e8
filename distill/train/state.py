"""The train state and its sharded creation.

The state is a plain dict pytree so that Orbax, optax and jit treat it uniformly:
  {'step': int32, 'rng': key data, 'params': nnx.State, 'opt_state': optax state,
   'algo': algorithm state (replay buffers, schedules; {} when none)}
The teacher is not part of it: it is a frozen input of the step, never checkpointed.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from distill.models import ModelConfig
from distill.models.sharded import abstract_model, param_shardings, random_params
from distill.parallel import memory as memory_lib
from distill.parallel import mesh as mesh_lib


def state_shardings(abstract_state, params_sharding, mesh: Mesh):
  """Optimiser moments follow their params; everything else is replicated."""
  replicated = mesh_lib.replicated(mesh)
  param_struct = jax.tree.structure(params_sharding)

  def for_subtree(subtree):
    # optax states hold params-shaped subtrees (mu, nu) next to scalars (count).
    if jax.tree.structure(subtree) == param_struct:
      return params_sharding
    return None

  opt_sharding = jax.tree.map(
      lambda sub: for_subtree(sub),
      abstract_state['opt_state'],
      is_leaf=lambda x: jax.tree.structure(x) == param_struct)
  opt_sharding = jax.tree.map(lambda s: replicated if s is None else s, opt_sharding,
                              is_leaf=lambda x: x is None)
  out = {k: jax.tree.map(lambda _: replicated, v) for k, v in abstract_state.items()}
  out['params'] = params_sharding
  out['opt_state'] = opt_sharding
  return out


def _init_fn(model_config: ModelConfig, optimizer, algo_state_fn):
  def init(init_rng, train_rng, params):
    params = random_params(model_config, init_rng) if params is None else params
    return {'step': jnp.zeros((), jnp.int32), 'rng': train_rng, 'params': params,
            'opt_state': optimizer.init(params), 'algo': algo_state_fn()}
  return init


def abstract_train_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                         rng, mesh: Mesh, algo_state_fn: Callable[[], Any] = dict,
                         initial_params=None, rules=mesh_lib.DEFAULT_RULES):
  """(abstract state, shardings, graphdef) of create_train_state's state, nothing allocated;
  refused (memory.DoesNotFit) when one device's share exceeds what it can hold."""
  graphdef, abstract_params = abstract_model(model_config)
  params_sharding = param_shardings(abstract_params, mesh, rules)
  abstract_state = jax.eval_shape(_init_fn(model_config, optimizer, algo_state_fn),
                                  *jax.random.split(rng), initial_params)
  shardings = state_shardings(abstract_state, params_sharding, mesh)
  memory_lib.check_state(abstract_state, shardings, sizes=', '.join(
      f'model.{k}={getattr(model_config, k)}' for k in ('n_layers', 'd_model', 'd_ff',
                                                        'vocab_size')))
  return abstract_state, shardings, graphdef


def create_train_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                       rng, mesh: Mesh, algo_state_fn: Callable[[], Any] = dict,
                       initial_params=None, rules=mesh_lib.DEFAULT_RULES):
  """Returns (state, shardings, graphdef); the state lives in its shardings.

  initial_params: start from these (already sharded) params instead of a random init.
  rules: the logical-axis rules of the student's params (and so of its optimiser moments).
  Refused (memory.DoesNotFit) before it is created when it exceeds what a device can hold.
  """
  _, shardings, graphdef = abstract_train_state(model_config, optimizer, rng, mesh,
                                                algo_state_fn, initial_params, rules)
  init = _init_fn(model_config, optimizer, algo_state_fn)
  state = jax.jit(init, out_shardings=shardings)(*jax.random.split(rng), initial_params)
  return state, shardings, graphdef
