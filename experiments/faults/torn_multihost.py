"""A two-process job whose newest checkpoint only process 1 sees torn restores one step.

    python -m distill.parallel.launch --processes=2 --devices_per_process=1 -- \\
        -m experiments.faults.torn_multihost DIR

Both processes save steps 1 and 2 of an array sharded over their devices. Process 1 then
sees step 2 torn, as a host with a stale view of shared storage would (its integrity check
reports a short file; the files themselves are intact): alone it would restore step 1 while
process 0 restores step 2. Each prints `process I: restored step S` and the job exits 1
unless every process restored step 1 with the values saved there.
"""
from __future__ import annotations

import sys

from absl import app, flags
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from distill.data import integrity
from distill.parallel import distributed
from distill.train import checkpoint as ckpt_lib

_ADDRESS = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0')
_PROCESSES = flags.DEFINE_integer('num_processes', None, 'processes in the job')
_ID = flags.DEFINE_integer('process_id', None, 'this process')
IDENTITY = {'run': 'torn-multihost'}


def _state(shardings: dict, step: int) -> dict:
  values = {'w': np.arange(4096, dtype=np.float32) * step, 'step': np.int32(step)}
  return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda index, v=v: v[index])
          for k, v in values.items()}


def _stale_view_of(step_dir: str):
  """integrity.problems as a host that sees `step_dir` torn."""
  real = integrity.problems
  return lambda directory: (['state/_METADATA has 0 bytes, 812 were written']
                            if directory == step_dir else real(directory))


def main(argv):
  workdir = argv[1]
  distributed.initialize(_ADDRESS.value, _PROCESSES.value, _ID.value, timeout_s=60)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  shardings = {'w': NamedSharding(mesh, PartitionSpec('data')),
               'step': NamedSharding(mesh, PartitionSpec())}
  checkpointer = ckpt_lib.Checkpointer(workdir, IDENTITY)
  for step in (1, 2):
    checkpointer.save(step, _state(shardings, step), {'at': step})
  checkpointer.close()

  checkpointer = ckpt_lib.Checkpointer(workdir, IDENTITY)
  if jax.process_index() == 1:
    ckpt_lib.integrity.problems = _stale_view_of(checkpointer.step_directory(2))
  restored, data = checkpointer.restore(_state(shardings, 0), shardings)
  step = int(restored['step'])
  print(f'process {jax.process_index()}: restored step {step}', flush=True)
  shards = restored['w'].addressable_shards
  values_ok = all(np.array_equal(s.data, np.arange(4096, dtype=np.float32)[s.index] * step)
                  for s in shards)
  steps = multihost_utils.process_allgather(np.int32(step))
  checkpointer.close()
  sys.exit(0 if values_ok and data == {'at': step} and (steps == 1).all() else 1)


if __name__ == '__main__':
  app.run(main)
