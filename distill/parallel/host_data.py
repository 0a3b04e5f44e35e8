"""Each process loads only its rows of every global batch.

Process p of P holds rows [p·B/P, (p+1)·B/P) of each global batch of B rows, in the order a
single process would read them, so `jax.make_array_from_process_local_data` assembles the
same global batches on any number of processes (a 2-process run trains on the rows of the
1-process run) and nothing outside a process's share is encoded there.
"""
from __future__ import annotations

import grain
import jax


def host_rows(dataset: grain.MapDataset, global_batch: int) -> grain.MapDataset:
  """This process's share of the examples of `dataset`, batched later by B / P."""
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return dataset
  if global_batch % count:
    raise ValueError(f'config.data.batch_size={global_batch} is not divisible by the '
                     f'{count} processes')
  local = global_batch // count

  def global_position(i):
    return (i // local) * global_batch + index * local + i % local

  batches = len(dataset) // global_batch
  return grain.MapDataset.range(batches * local).map(lambda i: dataset[global_position(i)])
