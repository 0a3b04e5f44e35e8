"""What the user sees of the teacher and the student at each log: time, entropy, KL, alarms.

At every log step the trainer calls `Monitor.at_log(step, params, batch, step_s)`, which adds:
  teacher_s, teacher_share  the teacher's seconds per step and their share of the step time.
                            In-process, the teacher runs inside the jitted step where it
                            cannot be timed apart, so its forward pass over the logged batch is
                            timed on its own (a separately compiled call, once per log; a
                            lower bound: the step also forms the teacher's logits in the
                            loss). Served (teacher.server), it is the time the loop waited for
                            the batch's top-k (requests run ahead of the steps, so this is
                            what the server costs the run), with teacher_request_s the
                            requests' own duration per batch; for the student's samples
                            scored between the step's two phases, the requests' time.
  student_entropy           the student's mean next-token entropy (nats) over the logged
                            batch's loss tokens,
  probe_kl                  the forward KL(teacher‖student) on them (temperature 1; the
                            teachers' mixture with several teachers; absent without an
                            in-process teacher: then the spike alarm watches `loss`).
Top-k methods log `topk_mass` themselves (the teacher probability the top-k cover).

Alarms, each raised once per run with its step named, as a Python warning and a metric in
metrics.jsonl (`alarm/entropy_collapse`, `alarm/kl_spike`, value = the step):
  entropy collapse  student_entropy below `entropy_floor` × its first logged value;
  KL spike          the watched KL above `kl_spike` × the median of the previous
                    `kl_window` logged values (once at least 3 are known).
On resume the history is read back from metrics.jsonl, so alarms do not depend on restarts.

config.monitor.probe=False (the default of 'small' smoke configs, whose runs are mostly
compile time) skips the two separately compiled programs: no student_entropy, probe_kl or
in-process teacher_s; the served teacher's time and the spike alarm on `loss` remain.
"""
from __future__ import annotations

import statistics
import time
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from distill import losses
from distill.algorithms import divergence, teachers
from distill.algorithms.cache_rows import CacheRows


def _logits(graphdef, params, batch):
  if teachers.is_ensemble(graphdef):
    return teachers.ensemble_logits(graphdef, params, batch)
  return nnx.merge(graphdef, params)(batch['tokens'], batch['input_mask'])


def probe(student_graphdef, teacher_graphdef, params, teacher_params, batch) -> dict:
  """(Σ, count) of the student's entropy and, with a teacher, forward KL over loss tokens."""
  mask = batch['loss_mask'] != 0
  logprobs = jax.nn.log_softmax(_logits(student_graphdef, params, batch).astype(jnp.float32))
  entropy = -(jnp.exp(logprobs) * logprobs).sum(-1)
  count = mask.sum().astype(jnp.float32)
  sums = {'student_entropy': (jnp.where(mask, entropy, 0.0).sum(), count)}
  if teacher_graphdef is not None:
    kl = losses.get('forward_kl')(logprobs, _logits(teacher_graphdef, teacher_params, batch), mask)
    sums['probe_kl'] = (kl.sum(), count)
  return sums


class Alarms:
  """Entropy collapse and KL spikes over the logged values; each raised once."""

  def __init__(self, entropy_floor: float, kl_spike: float, kl_window: int):
    self.entropy_floor, self.kl_spike, self.kl_window = entropy_floor, kl_spike, kl_window
    self.first_entropy = None
    self.kls: list[float] = []
    self.raised: dict[str, int] = {}

  def replay(self, records: list[dict]) -> None:
    """The history of an earlier part of the run (metrics.jsonl lines), alarms included."""
    for record in records:
      self.check(record['step'], record, quiet=True)
      self.raised.update({k.split('/', 1)[1]: v for k, v in record.items()
                          if k.startswith('alarm/')})

  def check(self, step: int, values: dict, quiet: bool = False) -> dict:
    """{alarm/NAME: step} for the alarms this log raises (each once per run)."""
    raised = {}
    entropy = values.get('student_entropy')
    if entropy is not None:
      if self.first_entropy is None:
        self.first_entropy = entropy
      elif entropy < self.entropy_floor * self.first_entropy:
        raised['entropy_collapse'] = (
            f'the student\'s entropy collapsed at step {step}: {entropy:.4g} nats, below '
            f'{self.entropy_floor:g} x its first logged value {self.first_entropy:.4g}')
    watched = 'probe_kl' if 'probe_kl' in values else 'loss'
    kl = values.get(watched)
    if kl is not None:
      recent = self.kls[-self.kl_window:]
      if len(recent) >= 3 and kl > self.kl_spike * statistics.median(recent):
        raised['kl_spike'] = (f'{watched} spiked at step {step}: {kl:.4g}, above {self.kl_spike:g} x '
                              f'the median {statistics.median(recent):.4g} of the last '
                              f'{len(recent)} logged values')
      self.kls.append(kl)
    out = {}
    for name, message in raised.items():
      if name in self.raised:
        continue
      self.raised[name] = step
      out[f'alarm/{name}'] = step
      if not quiet:
        warnings.warn(message)
    return out


def teacher_in_step(method) -> bool:
  """Whether the compiled step runs the teacher: not for rows read from a cache (teacher
  top-k, teacher generations) unless the objective adds word-level KD to them."""
  if not isinstance(method.rows, CacheRows):
    return True
  return isinstance(method.objective, divergence.Divergence) and method.config.loss.kd_weight > 0


class Monitor:
  """Per-log measurements and alarms of one run (see the module doc)."""

  def __init__(self, run, method, batches, student_graphdef):
    m = run.config.monitor
    self.alarms = Alarms(m.entropy_floor, m.kl_spike, m.kl_window)
    self.run, self.student_graphdef = run, student_graphdef
    # Served: what keeps the teacher's time (the batch iterator that fetches top-k ahead, or
    # the rows hook that scores each step's samples between its two phases).
    self.served_timing = (getattr(batches, 'take_timing', None) or
                          getattr(method.rows, 'take_timing', None))
    self.probe = jax.jit(probe, static_argnums=(0, 1)) if m.probe else None
    self.teacher_forward = None
    if m.probe and run.teacher_params is not None and teacher_in_step(method):
      self.teacher_forward = jax.jit(_logits, static_argnums=0)

  def teacher_seconds(self, batch) -> dict:
    """{teacher_s, [teacher_request_s]}: the teacher's time per step (see the module doc)."""
    if self.served_timing is not None:   # served: what the loop waited for the answers
      return self.served_timing()
    if self.teacher_forward is None:
      return {}
    args = (self.run.teacher_graphdef, self.run.teacher_params, batch)
    jax.block_until_ready(self.teacher_forward(*args))   # compiled (once) and warm
    start = time.perf_counter()
    jax.block_until_ready(self.teacher_forward(*args))
    return {'teacher_s': time.perf_counter() - start}

  def at_log(self, step: int, params, batch, step_s: float, logged: dict) -> dict:
    """The values to log beside `logged` (this log's averaged step metrics)."""
    values = {}
    if self.probe is not None:
      sums = jax.device_get(self.probe(self.student_graphdef, self.run.teacher_graphdef, params,
                                       self.run.teacher_params, batch))
      values = {k: float(s) / max(float(c), 1.0) for k, (s, c) in sums.items()}
    values.update(self.teacher_seconds(batch))
    if 'teacher_s' in values and step_s > 0:
      values['teacher_share'] = min(values['teacher_s'] / step_s, 1.0)
    values.update(self.alarms.check(step, {**logged, **values}))
    return values
