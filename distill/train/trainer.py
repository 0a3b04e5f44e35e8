"""The training loop: config → mesh → data → (teacher, student) → step → metrics/checkpoints.

`train(config, workdir)` is what `python -m distill.main` runs; everything is importable
so a notebook can drive the same pieces. A run killed at any point and started again
with the same command resumes from its last checkpoint and ends bit-identical on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from distill import algorithms, losses
from distill.data import pipeline, tasks
from distill.data.hf_tokenizer import HFTokenizer
from distill.data.tokenizer import CharTokenizer
from distill.eval import evaluate as eval_lib
from distill.models import ModelConfig, count_params, get_preset
from distill.parallel import mesh as mesh_lib
from distill.train import checkpoint as ckpt_lib
from distill.train import config as config_lib
from distill.train import logging as log_lib
from distill.train import optimizer as opt_lib
from distill.train import state as state_lib
from distill.train import step as step_lib
from distill.train import teacher as teacher_lib


_KILL_AT_STEP = int(os.environ.get('DISTILL_KILL_AT_STEP', '0'))


@dataclasses.dataclass
class Run:
  """What a run is made of, built and validated before anything compiles."""
  config: Any
  workdir: str
  tokenizer: Any               # CharTokenizer or HFTokenizer (same interface)
  task: Any
  mesh: jax.sharding.Mesh
  model_config: ModelConfig
  teacher_graphdef: Any = None
  teacher_params: Any = None
  teacher_config: ModelConfig | None = None
  initial_params: Any = None    # the student's starting point (model.init_from)

  @property
  def seq_len(self) -> int:
    return self.config.task.prompt_len + self.config.task.completion_len

  def identity(self) -> dict:
    """What must match for a checkpoint to be resumed by this run."""
    return {'model': dataclasses.asdict(self.model_config),
            'task': self.config.task.to_dict(),
            'tokenizer': self.tokenizer.fingerprint(),
            'role': self.config.role,
            'algorithm': self.config.algorithm.name}


def build_run(config, workdir: str) -> Run:
  config_lib.validate(config)
  tokenizer = HFTokenizer(config.tokenizer) if config.tokenizer else CharTokenizer()
  task = tasks.get_task(config.task.name, **config.task.kwargs)
  config = config.copy_and_resolve_references()
  if not (config.task.prompt_len and config.task.completion_len):
    needed = tasks.sequence_lengths(task)
    for name, length in zip(('prompt_len', 'completion_len'), needed):
      config.task[name] = config.task[name] or length
  mesh = mesh_lib.make_mesh(config.mesh)
  initial_params = None
  if config.model.init_from:
    _, initial_params, model_config = teacher_lib.load_exported(config.model.init_from, mesh)
  else:
    overrides = config_lib.model_overrides(config)
    model_config = get_preset(config.model.preset,
                              **{'vocab_size': tokenizer.vocab_size, **overrides})
  if model_config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'the model vocabulary ({model_config.vocab_size}) is smaller than the '
                     f'tokenizer\'s ({tokenizer.vocab_size})')
  config_lib.validate(config, model_max_seq_len=model_config.max_seq_len,
                      data_parallel=mesh_lib.data_parallel_size(mesh))
  run = Run(config, workdir, tokenizer, task, mesh, model_config, initial_params=initial_params)
  if config.role == 'student' and config.teacher.checkpoint:
    graphdef, params, teacher_config = teacher_lib.load_exported(config.teacher.checkpoint, mesh)
    if teacher_config.max_seq_len < run.seq_len:
      raise ValueError(f'sequence length {run.seq_len} exceeds the teacher\'s max_seq_len '
                       f'{teacher_config.max_seq_len}')
    if teacher_config.vocab_size != model_config.vocab_size:
      raise ValueError(f'teacher vocabulary ({teacher_config.vocab_size}) != student vocabulary '
                       f'({model_config.vocab_size}); distillation over logits needs equal vocabularies')
    if config.teacher.preset and get_preset(
        config.teacher.preset, vocab_size=tokenizer.vocab_size) != teacher_config:
      raise ValueError(f'teacher.preset={config.teacher.preset!r} does not match the model saved in '
                       f'{config.teacher.checkpoint}: {teacher_config}')
    run.teacher_graphdef, run.teacher_params, run.teacher_config = graphdef, params, teacher_config
  return run


def make_token_fn(config, has_teacher: bool):
  loss = config.loss
  kd_weight = loss.kd_weight if has_teacher else 0.0
  ce_weight = loss.ce_weight if has_teacher else 1.0
  hparams, unused = losses.divergences.split_hparams(loss.divergence, dict(loss.hparams))
  if unused:
    logging.warning('loss.hparams %s are not used by divergence %r', unused, loss.divergence)
  return losses.token_objective(
      loss.divergence, kd_weight=kd_weight, ce_weight=ce_weight, temperature=loss.temperature,
      temperature_squared_scale=loss.temperature_squared_scale, **hparams)


def train_iterator(run: Run):
  c = run.config
  return pipeline.make_iterator(
      run.task, run.tokenizer, split='train', batch_size=c.data.batch_size // jax.process_count(),
      prompt_len=c.task.prompt_len, completion_len=c.task.completion_len, seed=c.seed,
      shuffle=True, shard_index=jax.process_index(), shard_count=jax.process_count())


def to_global(batch: dict, sharding) -> dict:
  """Host-local numpy rows → one global array per field, split along the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def train(config, workdir: str) -> dict:
  """Trains (or resumes) a run and returns its final evaluation metrics."""
  os.makedirs(workdir, exist_ok=True)
  run = build_run(config, workdir)
  config = run.config   # with the task's sequence lengths resolved
  algorithm = algorithms.get(config.algorithm.name)(config, run)
  algorithm.validate()
  optimizer = opt_lib.make_optimizer(config)
  has_teacher = run.teacher_params is not None
  ctx = step_lib.StepContext(
      student_graphdef=None, teacher_graphdef=run.teacher_graphdef, optimizer=optimizer,
      token_fn=make_token_fn(config, has_teacher), chunk_size=config.loss.chunk_size,
      reduction=config.loss.reduction)

  state, shardings, graphdef = state_lib.create_train_state(
      run.model_config, optimizer, jax.random.PRNGKey(config.seed), run.mesh,
      algo_state_fn=algorithm.init_state, initial_params=run.initial_params)
  run.initial_params = None   # the state owns them now
  ctx = dataclasses.replace(ctx, student_graphdef=graphdef)
  _write_run_files(run, state['params'])

  checkpointer = ckpt_lib.Checkpointer(workdir, run.identity(), max_to_keep=config.keep_checkpoints)
  batches = algorithm.train_batches(train_iterator(run))
  start_step = 0
  if checkpointer.latest_step() is not None:
    state, data_state = checkpointer.restore(state, shardings)
    batches.set_state(data_state)
    start_step = int(jax.device_get(state['step']))
  writer = log_lib.MetricsWriter(workdir, config, resume_step=start_step)

  batch_sharding = mesh_lib.batch_sharding(run.mesh)
  teacher_shardings = jax.tree.map(lambda x: x.sharding, run.teacher_params)
  step_fn = jax.jit(
      lambda s, t, b: algorithm.step(ctx, s, t, b),
      in_shardings=(shardings, teacher_shardings, batch_sharding),
      out_shardings=(shardings, None), donate_argnums=(0,))

  progress = _progress(config, start_step)
  pending: list[dict] = []
  last_log = time.perf_counter()
  for step in range(start_step + 1, config.total_steps + 1):
    batch = to_global(next(batches), batch_sharding)
    state, metrics = step_fn(state, run.teacher_params, batch)
    pending.append(metrics)   # stays on device: the next step is dispatched before reading
    is_checkpoint = step % config.checkpoint_steps == 0 or step == config.total_steps
    # Logging at every checkpoint too keeps a resumed run's metrics identical.
    if step % config.log_steps == 0 or is_checkpoint:
      values = log_lib.reduce_metrics(pending)
      elapsed = time.perf_counter() - last_log
      values['tokens_per_s'] = len(pending) * config.data.batch_size * run.seq_len / elapsed
      values['learning_rate'] = float(opt_lib.learning_rate_schedule(config)(step))
      writer.write(step, values)
      progress.update(step, values)
      pending, last_log = [], time.perf_counter()
    if config.eval_steps and step % config.eval_steps == 0 and step != config.total_steps:
      eval_metrics = eval_lib.evaluate(run, graphdef, state['params'])
      writer.write(step, {f'eval/{k}': v for k, v in eval_metrics.items()}, check_finite=())
      state = algorithm.after_eval(state, eval_metrics)
    if is_checkpoint:
      checkpointer.save(step, state, batches.get_state())
    if step == _KILL_AT_STEP:   # fault injection for the resume tests (a crash, not an exit)
      os.kill(os.getpid(), signal.SIGKILL)
  checkpointer.close()
  progress.close()

  final = eval_lib.evaluate(run, graphdef, state['params'])
  final['params'] = count_params(state['params'])
  writer.write(config.total_steps, {f'final/{k}': v for k, v in final.items()}, check_finite=())
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump(final, f, indent=1)
  teacher_lib.export_final(workdir, run.model_config, state['params'])
  return final


def _write_run_files(run: Run, params):
  if jax.process_index() != 0:
    return
  with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
    f.write(run.config.to_json_best_effort(indent=1, sort_keys=True))
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
