"""Architecture hyper-parameters of the decoder-only transformer (Llama / Qwen / Mistral family)."""
import dataclasses

DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Transformer. Validated on construction."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  head_dim: int = 0            # 0 means d_model // n_heads
  max_seq_len: int = 2048
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  qk_norm: bool = False        # Qwen3: RMSNorm over head_dim on q and k, before RoPE
  qkv_bias: bool = False       # Qwen2: bias on the q, k, v projections
  tie_embeddings: bool = False
  dtype: str = 'float32'       # compute dtype; logits are always returned in fp32
  param_dtype: str = 'float32'
  remat: bool = False          # jax.checkpoint each layer (saves activation memory in training)
  scan_unroll: int = 1         # unroll factor of the scan over layers

  def __post_init__(self):
    self.validate()

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  def validate(self) -> None:
    """Raises ValueError naming the first offending field."""
    for name in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff',
                 'max_seq_len', 'scan_unroll'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'ModelConfig.{name} must be a positive int, got {value!r}')
    if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 0:
      raise ValueError(f'ModelConfig.head_dim must be an int >= 0 (0 = d_model // n_heads), '
                       f'got {self.head_dim!r}')
    if self.head_dim == 0 and self.d_model % self.n_heads:
      raise ValueError(f'ModelConfig.d_model={self.d_model} is not divisible by '
                       f'n_heads={self.n_heads}; set head_dim explicitly')
    if self.resolved_head_dim % 2:
      raise ValueError(f'ModelConfig.head_dim must be even for RoPE, got {self.resolved_head_dim}')
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f'ModelConfig.n_heads={self.n_heads} must be a multiple of '
                       f'n_kv_heads={self.n_kv_heads} (grouped-query attention)')
    for name in ('rope_theta', 'norm_eps'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f'ModelConfig.{name} must be a positive number, got {value!r}')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'ModelConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}')
    for name in ('qk_norm', 'qkv_bias', 'tie_embeddings', 'remat'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'ModelConfig.{name} must be a bool, got {getattr(self, name)!r}')
