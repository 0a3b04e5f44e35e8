"""distill: knowledge distillation of language models in JAX."""
import flax

# Parameters carry logical axis names as metadata only; the framework maps them to
# mesh axes itself (distill.parallel), so Flax must not try to shard eagerly.
flax.config.update('flax_always_shard_variable', False)
