"""Decoder-only transformer (Llama, Qwen, Mistral, Gemma 2-3, Phi-3), KV cache and presets."""
from distill.models.config import ModelConfig
from distill.models.presets import PRESETS, get_preset
from distill.models.transformer import CACHE_AXES, Transformer, count_params

__all__ = ['CACHE_AXES', 'ModelConfig', 'PRESETS', 'Transformer', 'count_params', 'get_preset']
# Hugging Face checkpoints in and out (distill.models.hf).
from distill.models.hf import load_hf, save_hf  # noqa: E402
__all__ += ['load_hf', 'save_hf']
