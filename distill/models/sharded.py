"""The model as abstract shapes and as sharded parameters (no weights on one device).

Everything that needs the student's or the teacher's parameter layout — the train state,
checkpoint restore, Hugging Face import — builds it from here: abstract shapes first, then
each parameter's NamedSharding from the logical axis names the model attached.
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from distill.models.config import ModelConfig
from distill.models.transformer import Transformer
from distill.parallel import mesh as mesh_lib


def abstract_model(model_config: ModelConfig):
  """(graphdef, abstract params) without allocating any weights."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))


def param_shardings(abstract_params, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES):
  """NamedShardings for params from the logical axis names the model attached."""
  logical = nnx.get_partition_spec(abstract_params)
  return jax.tree.map(
      lambda leaf, spec: mesh_lib.named_sharding(leaf.shape, spec, mesh, rules),
      abstract_params, logical,
      is_leaf=lambda x: isinstance(x, P))


def random_params(model_config: ModelConfig, rng):
  """A fresh initialisation's params (traceable: jit it with out_shardings)."""
  return nnx.split(Transformer(model_config, rngs=nnx.Rngs(params=rng)))[1]


def init_params(model_config: ModelConfig, rng, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES):
  """Creates params directly in their shardings (never whole on one device)."""
  _, abstract = abstract_model(model_config)
  shardings = param_shardings(abstract, mesh, rules)
  return jax.jit(random_params, static_argnums=0, out_shardings=shardings)(model_config, rng)


def in_dtype(model_config: ModelConfig, params, dtype: str):
  """(graphdef, params, config) of the model with params and compute in `dtype` (e.g. a
  bf16 teacher beside an fp32 student); each param keeps its sharding."""
  config = dataclasses.replace(model_config, dtype=dtype, param_dtype=dtype)
  graphdef, _ = abstract_model(config)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), out_shardings=shardings,
                 donate_argnums=0)
  return graphdef, cast(params), config
