"""SeqKD's rows: sequence-level KD (Kim & Rush, 2016), the teacher's own outputs as data.

Before training, the teacher completes the prompts of the first `num_prompts` train examples
(greedy by default, the paper's beam-search stand-in; or sampled with temperature / top_k /
top_p). The completions are written once as a dataset (distill.algorithms.cache_rows) and
every later run with the same teacher and settings reuses it. The objective is config.loss
on these rows: word-level KD as well when config.loss.kd_weight > 0 (Kim & Rush's
"Seq-KD + Word-KD"), or cross-entropy on the teacher's tokens only (pure SeqKD, the
config's default).

kwargs: num_prompts (4096), temperature (0 = greedy), top_k (0), top_p (1), rows_per_shard
(1024), batch_size (prompts per generation pass; 0: config.data.eval_batch_size),
cache_dir ('': WORKDIR/seqkd). Sampling uses config.seed, batch by batch, so a resumed
writer samples exactly what an uninterrupted one would.
"""
from __future__ import annotations

import jax

from distill import sampling
from distill.algorithms import rollout
from distill.algorithms.cache_rows import CACHE_DEFAULTS, CacheRows
from distill.algorithms.hooks import ROW_KEYS


class TeacherGenerations(CacheRows):
  DEFAULTS = {'num_prompts': 4096, 'temperature': 0.0, 'top_k': 0, 'top_p': 1.0,
              **CACHE_DEFAULTS}
  KIND, LABEL, CACHE_SUBDIR = 'seqkd', 'seqkd data', 'seqkd'

  def num_rows(self) -> int:
    return self.positive_int('num_prompts')

  def check(self) -> None:
    c = self.config
    self.sampling = rollout.sampling_config(self)
    try:
      sampling.validate_sampling(self.sampling, self.run.teacher_config, c.task.prompt_len)
    except ValueError as e:
      raise ValueError(f'algorithm seqkd, sampling from config.algorithm.kwargs: {e}') from None
    super().check()

  def identity_settings(self) -> dict:
    o = self.options
    return {'temperature': o['temperature'], 'top_k': o['top_k'], 'top_p': o['top_p'],
            'seed': self.config.seed, 'batch_size': self.write_batch_size}

  def compute(self, teacher_params, batch, first_row):
    prompt_len = self.config.task.prompt_len
    prompt_BxP = batch['tokens'][:, :prompt_len]
    prompt_mask_BxP = batch['input_mask'][:, :prompt_len]
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), first_row)
    sample = sampling.generate(self.run.teacher_graphdef, teacher_params, prompt_BxP,
                               prompt_mask_BxP, rng, self.sampling)
    rows = sampling.training_batch(prompt_BxP, prompt_mask_BxP, sample, self.sampling.pad_id)
    return {k: rows[k] for k in ROW_KEYS}
