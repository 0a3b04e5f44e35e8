"""What one device holds for the compiled step, printed at start-up and checked before the
first step runs.

The state's and the teacher's shares come from their shardings; XLA's memory analysis of the
compiled (SPMD-partitioned, so per-device) step gives its arguments, outputs and temporaries
(activations, gradients, the loss's chunks). The step's footprint is arguments + outputs +
temporaries, donated buffers counted once. A device's memory is what the backend reports
(GPU/TPU allocators' bytes_limit) or config.mesh.device_memory_gb; CPU reports none and its
step is not checked. Before any of that, the train state's share per device is checked
against what a device can hold (on CPU, its share of the host's memory): check_state.
"""
from __future__ import annotations

import math
import os

import jax

GIB = 2**30


class DoesNotFit(ValueError):
  """The compiled step needs more memory per device than a device has."""


def per_device_bytes(tree) -> int:
  """Bytes of one device's shard of every array in `tree` (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def device_memory_bytes(configured_gb: float = 0.0) -> int | None:
  """Memory of one device: configured_gb when > 0, else the backend's figure (None on CPU)."""
  if configured_gb > 0:
    return int(configured_gb * 1e9)
  stats = jax.local_devices()[0].memory_stats()
  return stats.get('bytes_limit') if stats else None


def host_memory_per_device() -> int:
  """A CPU device's share of the host's physical memory (CPU devices share it)."""
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // jax.local_device_count()


def check_state(abstract_state, shardings, sizes: str = '') -> None:
  """Raises DoesNotFit before the train state is created when one device's share of it
  (params, optimizer moments, algorithm state) exceeds what the device can hold: the
  backend's figure, on CPU its share of the host's memory. The step's check (against
  mesh.device_memory_gb too) comes only after compiling, and a state this large would first
  fail inside XLA's allocation, or take the shared host's memory. `sizes`: the model's size
  fields, for the message."""
  placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, shardings)
  need = per_device_bytes(placed)
  limit = device_memory_bytes()
  of = 'a device'
  if limit is None:
    limit = host_memory_per_device()
    of = f'the host memory shared by {jax.local_device_count()} CPU device(s)'
  if need > limit:
    raise DoesNotFit(
        f'the train state does not fit: {_size(need)} per device (params '
        f'{_size(per_device_bytes(placed["params"]))}, optimizer '
        f'{_size(per_device_bytes(placed["opt_state"]))}), {of} has {_size(limit)}. Check the '
        f'model\'s size ({sizes}) or shard over more devices (mesh.fsdp, mesh.tensor)')


def step_report(compiled, state, teacher_params) -> dict:
  """Per-device bytes: the state's parts, the teacher, and the compiled step's footprint."""
  m = compiled.memory_analysis()
  return {
      'params': per_device_bytes(state['params']),
      'optimizer': per_device_bytes(state['opt_state']),
      'teacher': per_device_bytes(teacher_params),
      'temporaries': m.temp_size_in_bytes,
      'total': (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes),
  }


def _size(n: int) -> str:
  return f'{n / GIB:.2f} GiB' if n >= GIB else f'{n / 2**20:.1f} MiB'


def describe(report: dict, limit: int | None) -> str:
  parts = ', '.join(f'{name} {_size(report[name])}' for name in
                    ('params', 'optimizer', 'teacher', 'temporaries'))
  of = 'unknown (CPU)' if limit is None else _size(limit)
  return (f'memory per device: {_size(report["total"])} for the step ({parts}; temporaries = '
          f'activations, gradients, loss chunks) of {of}')


def check(report: dict, limit: int | None) -> None:
  if limit is not None and report['total'] > limit:
    raise DoesNotFit(
        f'the step does not fit: {describe(report, limit)}. Lower data.batch_size or raise '
        'data.grad_accum_steps, set model.remat_policy=full, shard over more devices '
        '(mesh.fsdp, mesh.tensor, teacher.sharding) or set teacher.dtype=bfloat16')


def checked_step(step_fn, configured_gb: float = 0.0, log=print):
  """step_fn whose first call compiles it ahead of time, prints its memory per device and
  raises DoesNotFit before running it when it exceeds a device's memory. The call after the
  ahead-of-time compilation reuses the executable (no second compilation)."""
  first = True

  def call(state, teacher_params, batch):
    nonlocal first
    if first:
      compiled = step_fn.lower(state, teacher_params, batch).compile()
      report, limit = step_report(compiled, state, teacher_params), \
          device_memory_bytes(configured_gb)
      if jax.process_index() == 0:
        log(describe(report, limit))
      check(report, limit)
      first = False
    return step_fn(state, teacher_params, batch)

  return call
