"""Named architecture presets. The vocabulary is given separately (it depends on the tokenizer).

The size in a student/teacher name is its parameter count at a char vocabulary of 64 (for the
larger presets this is essentially the non-embedding count). The published models' presets
carry the hyper-parameters of their config.json (their vocabulary sizes are in VOCAB_SIZES).
"""
import dataclasses
import difflib

from distill.models.config import ModelConfig


def _arch(d_model, n_layers, n_heads, n_kv_heads, d_ff, **kw):
  return dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
              d_ff=d_ff, **kw)


PRESETS = {
    # For unit tests: GQA so the grouped path is exercised.
    'tiny': _arch(32, 2, 4, 2, 64, max_seq_len=256),
    # Students (~15k .. ~100M at vocab 64).
    'student-15k': _arch(24, 2, 4, 4, 64),
    'student-40k': _arch(40, 2, 4, 4, 112),
    'student-100k': _arch(64, 2, 4, 4, 192),
    'student-500k': _arch(128, 2, 4, 4, 448),
    'student-2m': _arch(192, 4, 6, 6, 576),
    'student-10m': _arch(384, 6, 6, 6, 1024),
    'student-30m': _arch(512, 9, 8, 8, 1536),
    'student-100m': _arch(768, 12, 12, 4, 3072),
    # Teachers: deeper than the student of similar width.
    'teacher-1m': _arch(128, 4, 4, 4, 384),
    'teacher-5m': _arch(256, 6, 4, 4, 768),
    'teacher-20m': _arch(384, 12, 6, 6, 1024),
    'teacher-100m': _arch(768, 14, 12, 12, 2048),
    'teacher-300m': _arch(1024, 24, 16, 8, 3072),
    # The benchmark's shapes (experiments/bench/README.md; Llama-style, untied, q = kv heads).
    'bench-teacher': _arch(512, 8, 8, 8, 1536),
    'bench-student': _arch(256, 4, 4, 4, 768),
}

_LLAMA32_ROPE = dict(rope_theta=500_000.0, norm_eps=1e-5, tie_embeddings=True,
                     max_seq_len=131_072,
                     rope_scaling=dict(rope_type='llama3', factor=32.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192))
_GEMMA = dict(norm_plus_one=True, post_norms=True, embed_scale=True, mlp_activation='gelu_tanh',
              tie_embeddings=True, head_dim=256, query_pre_attn_scalar=256.0)


def _gemma3_layers(n_layers):
  """Gemma 3: five sliding layers, then a global one."""
  return tuple('full_attention' if (i + 1) % 6 == 0 else 'sliding_attention'
               for i in range(n_layers))


_QWEN3 = dict(head_dim=128, qk_norm=True, tie_embeddings=True, rope_theta=1e6, max_seq_len=40_960)
_SMOLLM2 = dict(rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192)

# The published models' hyper-parameters (from each one's config.json).
PRESETS.update({
    'llama-3.2-1b': _arch(2048, 16, 32, 8, 8192, head_dim=64, **_LLAMA32_ROPE),
    'llama-3.2-3b': _arch(3072, 28, 24, 8, 8192, head_dim=128, **_LLAMA32_ROPE),
    'gemma-2-2b': _arch(2304, 26, 8, 4, 9216, **_GEMMA, max_seq_len=8192, sliding_window=4096,
                        layer_types=('sliding_attention', 'full_attention') * 13,
                        attn_softcap=50.0, final_softcap=30.0),
    'gemma-3-1b': _arch(1152, 26, 4, 1, 6912, **_GEMMA, qk_norm=True, max_seq_len=32_768,
                        rope_theta=1e6, rope_local_theta=10_000.0, sliding_window=512,
                        layer_types=_gemma3_layers(26)),
    # The text model of gemma-3-4b (its vision tower is not part of distill).
    'gemma-3-4b': _arch(2560, 34, 8, 4, 10_240, **_GEMMA, qk_norm=True, max_seq_len=131_072,
                        rope_theta=1e6, rope_local_theta=10_000.0, sliding_window=1024,
                        layer_types=_gemma3_layers(34),
                        rope_scaling=dict(rope_type='linear', factor=8.0)),
    'qwen3-0.6b': _arch(1024, 28, 16, 8, 3072, **_QWEN3),
    'qwen3-1.7b': _arch(2048, 28, 16, 8, 6144, **_QWEN3),
    'qwen3-4b': _arch(2560, 36, 32, 8, 9728, **_QWEN3),
    'smollm2-135m': _arch(576, 30, 9, 3, 1536, **_SMOLLM2),
    'smollm2-360m': _arch(960, 32, 15, 5, 2560, **_SMOLLM2),
    'phi-3-mini': _arch(3072, 32, 32, 32, 8192, norm_eps=1e-5, max_seq_len=4096,
                        sliding_window=2047),
    # Phi-4-mini's longrope scaling is not implemented: plain RoPE, within its original 4096
    # context (the shapes, and so the parameter count, are the published model's).
    'phi-4-mini': _arch(3072, 32, 24, 8, 8192, head_dim=128, partial_rotary_factor=0.75,
                        norm_eps=1e-5, tie_embeddings=True, max_seq_len=4096),
})

VOCAB_SIZES = {'llama-3.2-1b': 128_256, 'llama-3.2-3b': 128_256, 'gemma-2-2b': 256_000,
               'gemma-3-1b': 262_144, 'gemma-3-4b': 262_208, 'qwen3-0.6b': 151_936,
               'qwen3-1.7b': 151_936, 'qwen3-4b': 151_936, 'smollm2-135m': 49_152,
               'smollm2-360m': 49_152, 'phi-3-mini': 32_064, 'phi-4-mini': 200_064}


def get_preset(name: str, vocab_size: int, **overrides) -> ModelConfig:
  """ModelConfig of preset `name` with `vocab_size`; `overrides` replace any ModelConfig field."""
  if name not in PRESETS:
    close = difflib.get_close_matches(name, PRESETS, n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise ValueError(f'Unknown model preset {name!r}.{hint} Valid presets: {", ".join(PRESETS)}')
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'Unknown ModelConfig field(s) {unknown} in overrides of preset {name!r}; '
                     f'valid fields: {sorted(fields)}')
  return ModelConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides})
