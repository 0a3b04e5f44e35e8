"""The training loop: a built run → state → step → metrics, evaluations and checkpoints.

`train(config, workdir)` is what `python -m distill.main` runs; everything is importable
so a notebook can drive the same pieces (distill.train.run builds the run, distill.train.step
the step). A run killed at any point and started again with the same command resumes from
its last checkpoint and ends bit-identical on CPU.
"""
from __future__ import annotations

import os
import time

import jax

from distill import algorithms
from distill import atomic_file
from distill.eval import evaluate as eval_lib
from distill.models import count_params
from distill.parallel import mesh as mesh_lib
from distill.parallel import memory as memory_lib
from distill.train import checkpoint as ckpt_lib
from distill.train import lock as lock_lib
from distill.train import monitor as monitor_lib
from distill.train import nonfinite as nonfinite_lib
from distill.train import logging as log_lib
from distill.train import optimizer as opt_lib
from distill.train import run as run_lib
from distill.train import state as state_lib
from distill.train import step as step_lib
from distill.train import teacher as teacher_lib


def make_method(run: run_lib.Run) -> algorithms.Method:
  """The run's method (config.algorithm), checked before anything compiles."""
  method = algorithms.Method(algorithms.get(run.config.algorithm.name), run.config, run)
  method.validate()
  return method


def train(config, workdir: str) -> dict:
  """Trains (or resumes) a run and returns its final evaluation metrics."""
  os.makedirs(workdir, exist_ok=True)
  with lock_lib.hold(workdir):   # a second job on this workdir is refused, its holder named
    return _train(config, workdir)


def _train(config, workdir: str) -> dict:
  run = run_lib.build_run(config, workdir)
  config = run.config   # with the task's sequence lengths resolved
  method = make_method(run)
  optimizer = opt_lib.make_optimizer(config)
  state, shardings, graphdef = state_lib.create_train_state(
      run.model_config, optimizer, jax.random.PRNGKey(config.seed), run.mesh,
      algo_state_fn=lambda: method.init_state(optimizer), initial_params=run.initial_params,
      rules=run.rules)
  run.initial_params = None   # the state owns them now
  _write_run_files(run, state['params'])

  checkpointer = ckpt_lib.Checkpointer(
      workdir, run.identity(), max_to_keep=config.keep_checkpoints,
      best_metric=config.keep_best.metric, best_mode=config.keep_best.mode,
      keep_best=config.keep_best.count)
  batches = method.train_batches(run_lib.train_iterator(run))
  start_step = 0
  if checkpointer.latest_step() is not None:
    state, data_state = checkpointer.restore(state, shardings)
    batches.set_state(data_state)
    start_step = int(jax.device_get(state['step']))
  writer = log_lib.MetricsWriter(workdir, config, resume_step=start_step)
  monitor = monitor_lib.Monitor(run, method, batches, graphdef)
  monitor.alarms.replay(writer.records())   # a resumed run's earlier logs

  batch_sharding = mesh_lib.batch_sharding(run.mesh)
  # Compiled on the first batch, its memory per device printed and checked before it runs.
  step_fn = memory_lib.checked_step(
      step_lib.make_step(config, run, method, graphdef, shardings, optimizer),
      config.mesh.device_memory_gb)

  progress = _progress(config, start_step)
  pending: list[dict] = []
  last_log = time.perf_counter()
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      batch = run_lib.to_global(next(batches), batch_sharding)
      state, metrics = step_fn(state, run.teacher_params, batch)
      pending.append(metrics)   # stays on device: the next step is dispatched before reading
      is_checkpoint = step % config.checkpoint_steps == 0 or step == config.total_steps
      # Logging at every checkpoint too keeps a resumed run's metrics identical.
      if step % config.log_steps == 0 or is_checkpoint:
        values = nonfinite_lib.reduce_finite(pending, step, config.nonfinite)
        elapsed = time.perf_counter() - last_log
        values['tokens_per_s'] = len(pending) * config.data.batch_size * run.seq_len / elapsed
        values['learning_rate'] = float(opt_lib.learning_rate_schedule(config)(step))
        values.update(monitor.at_log(step, state['params'], batch, elapsed / len(pending), values))
        writer.write(step, values)
        progress.update(step, values)
        pending, last_log = [], time.perf_counter()
      if config.eval_steps and step % config.eval_steps == 0 and step != config.total_steps:
        eval_metrics = eval_lib.evaluate(run, graphdef, state['params'])
        writer.write(step, {f'eval/{k}': v for k, v in eval_metrics.items()}, check_finite=())
        state = method.after_eval(state, eval_metrics)
      if is_checkpoint:
        checkpointer.save(step, state, batches.get_state(), metrics=writer.written_at(step))
  finally:
    # A run stopped by an error still finishes writing its last (good) checkpoint.
    checkpointer.close()
  progress.close()

  final = eval_lib.evaluate(run, graphdef, state['params'])
  final['params'] = count_params(state['params'])
  writer.write(config.total_steps, {f'final/{k}': v for k, v in final.items()}, check_finite=())
  writer.close()
  if jax.process_index() == 0:
    atomic_file.write_json(os.path.join(workdir, 'final_metrics.json'), final, indent=1)
  teacher_lib.export_final(workdir, run.model_config, state['params'])
  return final


def _write_run_files(run: run_lib.Run, params):
  if jax.process_index() != 0:
    return
  atomic_file.write_text(os.path.join(run.workdir, 'config.json'),
                         run.config.to_json_best_effort(indent=1, sort_keys=True))
  print(f'student {run.config.model.preset}: {count_params(params):,} parameters'
        + (f'; teacher: {count_params(run.teacher_params):,}' if run.teacher_params else '')
        + f'; mesh {dict(run.mesh.shape)} over {run.mesh.size} devices in '
        f'{jax.process_count()} process(es)')


class _progress:
  """tqdm bar with step, loss and throughput (process 0, when enabled)."""

  def __init__(self, config, start_step: int):
    self.bar = None
    if config.progress_bar and jax.process_index() == 0:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=config.total_steps, initial=start_step, dynamic_ncols=True)
    self.last = start_step

  def update(self, step: int, values: dict):
    if self.bar is not None:
      self.bar.update(step - self.last)
      self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                           tok_s=f"{values['tokens_per_s']:.0f}")
    self.last = step

  def close(self):
    if self.bar is not None:
      self.bar.close()
