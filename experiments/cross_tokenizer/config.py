"""Students of the cross-tokenizer study (experiments/cross_tokenizer/README.md).

ARG (comma-separated): one regime, and 'small' for a seconds-long smoke run.
  teacher       a teacher on ground truth (teacher-1m, 500 steps); --config.tokenizer picks
                its tokenizer
  ground_truth  cross-entropy on the dataset, no teacher
  kd            supervised KD (forward KL) from the character-tokenizer teacher
  uld           ULD from the BPE-tokenizer teacher (algorithm cross_tokenizer, loss 'uld')
  gold          shared-span losses from the BPE-tokenizer teacher (loss 'gold')
Teacher paths and the BPE tokenizer come from the command line (--config.teacher.checkpoint,
--config.teacher.tokenizer); run.sh sets them. Every regime mixes its distillation term with
cross-entropy half and half (as configs/arithmetic_student.py's kd), the same student, steps,
learning rate and seeds.
"""
from distill.train.config import base_config, make_small, parse_options

REGIMES = ('teacher', 'ground_truth', 'kd', 'uld', 'gold')


def get_config(arg=None):
  options = parse_options(arg, {
      'teacher': 'a teacher on ground truth', 'ground_truth': 'cross-entropy only',
      'kd': 'forward KL, same tokenizer',
      'uld': 'ULD, teacher with another tokenizer', 'gold': 'span losses, another tokenizer',
      'small': 'tiny model, few steps'})
  regimes = [r for r in REGIMES if r in options]
  if len(regimes) != 1:
    raise ValueError(f'choose exactly one regime of {REGIMES}, got {arg!r}')
  regime = regimes[0]
  c = base_config()
  c.role = 'student'
  c.task.name = 'arithmetic'
  c.task.kwargs.num_digits = 2
  c.model.preset = 'student-100k'
  c.data.batch_size = 64
  c.data.eval_batch_size = 64
  c.eval.max_batches = 8            # the whole 512-example eval split
  c.total_steps = 300
  c.checkpoint_steps = 300
  c.log_steps = 25
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.progress_bar = False
  c.wandb.mode = 'disabled'
  c.mesh.data = 1
  c.loss.kd_weight, c.loss.ce_weight = 0.5, 0.5
  if regime in ('teacher', 'ground_truth'):
    c.loss.kd_weight, c.loss.ce_weight = 0.0, 1.0
  if regime == 'teacher':
    c.role, c.model.preset = 'teacher', 'teacher-1m'
    c.total_steps = c.checkpoint_steps = 500
  if regime in ('uld', 'gold'):
    c.algorithm.name = 'cross_tokenizer'
    c.algorithm.kwargs.loss = regime
  if 'small' in options:
    make_small(c)
  return c
