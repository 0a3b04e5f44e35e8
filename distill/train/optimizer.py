"""AdamW with linear warm-up, cosine decay and global-norm clipping."""
from __future__ import annotations

import optax


def learning_rate_schedule(config) -> optax.Schedule:
  opt = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt.learning_rate,
      warmup_steps=opt.warmup_steps,
      decay_steps=max(config.total_steps, opt.warmup_steps + 1),
      end_value=opt.learning_rate * opt.final_lr_fraction,
  )


def make_optimizer(config) -> optax.GradientTransformation:
  opt = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay),
  )
