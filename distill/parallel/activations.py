"""How a traced step lays out its activations: their shardings at the model's layer boundaries
and which intermediates a layer keeps for the backward pass (the remat policy).

Both change where values live and what is recomputed, never a result, so neither is a
ModelConfig field (those count for a run's identity and a teacher's fingerprint): they are a
`Layout` the step builder enters while the step is traced (`traced_under`), and
distill.models.transformer reads it at trace time. Outside one (evaluation, sampling from a
notebook, export) the model constrains nothing and keeps its config's remat.

JAX caches a traced function by its identity, not by the layout: a function traced once (a
module-level jitted function, say) keeps the layout of its first trace. So a layout wraps a
function made for it, as make_step's fresh step function is.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Callable

import jax
from jax.sharding import Mesh

from distill.parallel import mesh as mesh_lib

# Logical axes of the activations the model constrains.
RESIDUAL = ('batch', 'length', 'embed')     # the residual stream between decoder blocks
LOGITS = ('batch', 'length', 'vocab')


@dataclasses.dataclass(frozen=True)
class Layout:
  """The run's mesh and logical-axis rules (None: no constraints) and remat policy ('' = the
  model config's: `remat=True` is 'full', otherwise 'named')."""
  mesh: Mesh | None = None
  rules: tuple = mesh_lib.DEFAULT_RULES
  remat: str = ''


_ACTIVE: contextvars.ContextVar[Layout] = contextvars.ContextVar('distill_layout',
                                                                 default=Layout())


def active() -> Layout:
  return _ACTIVE.get()


@contextlib.contextmanager
def laid_out(layout: Layout):
  """Traces inside this block use `layout`."""
  token = _ACTIVE.set(layout)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def traced_under(layout: Layout, fn: Callable) -> Callable:
  """fn whose body runs under `layout`; jit it, and its trace (hence its compiled step) has
  the layout's constraints and remat policy wherever the first call or `.lower()` happens."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with laid_out(layout):
      return fn(*args, **kwargs)
  return wrapped


def constrain(x, logical: tuple[str | None, ...]):
  """x constrained to the sharding its logical axes get under the active rules (dimensions
  the mesh axes do not divide stay whole); x itself when no mesh is active."""
  layout = _ACTIVE.get()
  if layout.mesh is None:
    return x
  if len(logical) != x.ndim:
    raise ValueError(f'logical axes {logical} do not match an array of shape {x.shape}')
  return jax.lax.with_sharding_constraint(
      x, mesh_lib.named_sharding(x.shape, logical, layout.mesh, layout.rules))
