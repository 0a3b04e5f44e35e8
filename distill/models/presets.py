"""Named architecture presets. The vocabulary is given separately (it depends on the tokenizer).

The size in a student/teacher name is its parameter count at a char vocabulary of 64 (for the
larger presets this is essentially the non-embedding count).
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
    # Students (~0.1M .. ~100M at vocab 64).
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
