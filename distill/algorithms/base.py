"""The interface every data regime implements."""
from __future__ import annotations

from typing import Any, Iterator

from distill.train import step as step_lib


class Algorithm:
  """Default behaviour: batches from the dataset, the plain distillation step.

  Subclasses override what they change:
    validate()          check their kwargs before anything is compiled;
    init_state()        algorithm state carried (and checkpointed) in state['algo'];
    train_batches(...)  a different source of training rows (e.g. SeqKD);
    step(...)           a different pure step (e.g. sampling from the student first);
    after_eval(...)     host-side reaction to validation metrics (e.g. DistiLLM).
  """

  def __init__(self, config, run):
    self.config = config
    self.kwargs = dict(config.algorithm.kwargs)
    self.run = run   # distill.train.trainer.Run: tokenizer, task, mesh, models

  def validate(self) -> None:
    if self.kwargs:
      raise ValueError(f'algorithm {self.config.algorithm.name!r} takes no kwargs, '
                       f'got {sorted(self.kwargs)}')

  def init_state(self) -> Any:
    return {}

  def train_batches(self, default: Iterator[dict]) -> Iterator[dict]:
    return default

  def step(self, ctx: step_lib.StepContext, state, teacher_params, batch):
    return step_lib.train_step(ctx, state, teacher_params, batch)

  def after_eval(self, state, eval_metrics: dict):
    return state
