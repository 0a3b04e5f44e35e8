"""What a run does when a step's loss or gradient is not finite (config.nonfinite).

'stop' (the default): the run stops at the next log point with an error naming the first
non-finite step and its non-finite metrics; no checkpoint is written after it, so the last
good checkpoint stays the newest. 'skip': that step leaves the train state as it was (inside
the jitted step, `keep_state_unless_finite`), the step's batch is consumed, the run
continues, and the skipped steps are counted (`skipped_steps` in metrics.jsonl) and named
in a warning.

Both are decided from the per-step metrics the trainer already holds between log points,
so no step waits on the host to read a flag.
"""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from distill.train import logging as log_lib

POLICIES = ('stop', 'skip')


def keep_state_unless_finite(old_state: dict, new_state: dict, metrics: dict) -> dict:
  """new_state when every metric (loss terms, grad_norm) is finite, else old_state with
  the step counter advanced. Traced inside the step."""
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(s)) for s, _ in metrics.values()]))
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                      {k: v for k, v in new_state.items() if k != 'step'},
                      {k: v for k, v in old_state.items() if k != 'step'})
  return dict(kept, step=new_state['step'])


def _nonfinite_names(metrics: dict) -> list[str]:
  return sorted(name for name, (value_sum, _) in metrics.items()
                if not math.isfinite(float(value_sum)))


def reduce_finite(pending: list[dict], last_step: int, policy: str) -> dict[str, float]:
  """The averaged metrics of steps last_step - len(pending) + 1 .. last_step.

  'stop': raises NonFiniteLossError naming the first non-finite step and its metrics.
  'skip': leaves the skipped steps out of the averages, counts them in 'skipped_steps'
  and warns naming them.
  """
  host = jax.device_get(pending)
  first_step = last_step - len(host) + 1
  bad = {first_step + i: names for i, m in enumerate(host) if (names := _nonfinite_names(m))}
  if bad and policy == 'stop':
    step, names = min(bad.items())
    raise log_lib.NonFiniteLossError(
        f'non-finite {", ".join(names)} at step {step}; stopping (the last checkpoint, before '
        'this step, is kept). Lower the learning rate, check the data and the teacher, or set '
        "--config.nonfinite=skip to skip such steps.")
  if policy == 'stop':
    return log_lib.reduce_metrics(host)
  if bad:
    warnings.warn('skipped the update of non-finite step(s) ' + '; '.join(
        f'{step} ({", ".join(names)})' for step, names in sorted(bad.items())))
  finite = [m for i, m in enumerate(host) if first_step + i not in bad]
  return {**log_lib.reduce_metrics(finite), 'skipped_steps': len(bad)}
