"""Quantization-aware distillation: GGUF block formats as JAX fake quantization (`blocks`) and the
student's per-tensor plan with straight-through gradients (`student`)."""
