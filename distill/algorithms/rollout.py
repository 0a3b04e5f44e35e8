"""Rows sampled inside the jitted step: the base of every on-policy rows rule.

Prompts are the first P = T - completion_len columns of the batch (left-padded, so
generation starts at column P for every row); completions are turned back into rows of the
standard batch layout with `sampling.training_batch`, so any objective applies to them
unchanged. No gradient flows through the sampling.

  Sampled            base rows hook: the sampling kwargs (temperature, top_k, top_p) checked
                     and turned into a SamplingConfig before compilation
  StudentSamples     the student completes every prompt (on-policy reverse KL; GKD at λ = 1)
  sample_rows        prompts of a batch completed by one model -> (rows, sample)
  joint_sample_rows  prompts completed with both models decoding side by side, a rule
                     picking each token (teacher-mixed sampling, SKD)
"""
from __future__ import annotations

import jax

from distill import sampling
from distill.algorithms import hooks

SAMPLING_DEFAULTS = {'temperature': 1.0, 'top_k': 0, 'top_p': 1.0}


def sampling_config(hook: hooks.Hook) -> sampling.SamplingConfig:
  """The hook's sampling kwargs (temperature, top_k, top_p) for completions of the task's
  length, stopping at the tokenizer's EOS."""
  o = hook.options
  return sampling.SamplingConfig(
      max_new_tokens=hook.config.task.completion_len, temperature=o['temperature'],
      top_k=o['top_k'], top_p=o['top_p'], eos_id=hook.run.tokenizer.eos_id,
      pad_id=hook.run.tokenizer.pad_id)


class Sampled(hooks.Rows):
  """Rows whose completions are sampled; `self.sampling` is set by check()."""
  DEFAULTS = SAMPLING_DEFAULTS
  needs_teacher = True
  samples = True
  teacher_generates = False   # the teacher also samples with self.sampling

  def check(self) -> None:
    c = self.config
    self.sampling = sampling_config(self)
    models = [self.run.model_config] + ([self.run.teacher_config] if self.teacher_generates else [])
    for model_config in models:
      try:
        sampling.validate_sampling(self.sampling, model_config, c.task.prompt_len)
      except ValueError as e:
        raise ValueError(f'algorithm {c.algorithm.name!r}, sampling '
                         f'(config.algorithm.kwargs): {e}') from None


class StudentSamples(Sampled):
  """The student completes each prompt of the batch."""

  def draw(self, ctx, inputs, batch):
    rows, sample = sample_rows(ctx.student_graphdef, inputs.params, batch, inputs.rng,
                               self.sampling)
    return hooks.Drawn(rows, inputs.state, {}, sample)


def prompts(batch: dict, completion_len: int):
  """(prompt_BxP, prompt_mask_BxP): the columns before generation starts."""
  prompt_len = batch['tokens'].shape[1] - completion_len
  return batch['tokens'][:, :prompt_len], batch['input_mask'][:, :prompt_len]


def sample_rows(graphdef, params, batch: dict, rng, cfg: sampling.SamplingConfig):
  """The batch's prompts completed by one model: (rows in the batch layout, the sample dict)."""
  prompt_BxP, prompt_mask_BxP = prompts(batch, cfg.max_new_tokens)
  sample = sampling.generate(graphdef, jax.lax.stop_gradient(params), prompt_BxP,
                             prompt_mask_BxP, rng, cfg)
  return sampling.training_batch(prompt_BxP, prompt_mask_BxP, sample, cfg.pad_id), sample


def joint_sample_rows(student_graphdef, student_params, teacher_graphdef, teacher_params,
                      batch: dict, rng, cfg: sampling.SamplingConfig, rule: sampling.JointRule):
  """The batch's prompts completed by `sampling.joint_generate` with `rule`: (rows, sample)."""
  prompt_BxP, prompt_mask_BxP = prompts(batch, cfg.max_new_tokens)
  sample = sampling.joint_generate(student_graphdef, student_params, teacher_graphdef,
                                   teacher_params, prompt_BxP, prompt_mask_BxP, rng, cfg, rule)
  return sampling.training_batch(prompt_BxP, prompt_mask_BxP, sample, cfg.pad_id), sample
