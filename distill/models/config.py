"""Architecture hyper-parameters of the decoder-only transformer (Llama / Qwen / Mistral / Gemma /
Phi-3 families). Every option beyond the Llama baseline is off by default, and each is a static
flag: a model that does not use it traces exactly the Llama computation."""
import dataclasses

DTYPES = ('float32', 'bfloat16')
ACTIVATIONS = ('silu', 'gelu_tanh')   # the MLP's gate activation: SwiGLU, or GeGLU (Gemma)
LAYER_TYPES = ('full_attention', 'sliding_attention')
# rope_scaling['rope_type'] values with an implementation (distill.models.rope).
ROPE_TYPES = ('default', 'linear', 'dynamic', 'llama3', 'yarn')


def _frozen(value):
  """Lists (e.g. from model.json) and dicts as the hashable tuples the frozen config holds."""
  if isinstance(value, dict):
    return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
  if isinstance(value, list):
    return tuple(_frozen(v) for v in value)
  return value


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
  qk_norm: bool = False        # Qwen3 / Gemma 3: RMSNorm over head_dim on q and k, before RoPE
  qkv_bias: bool = False       # Qwen2: bias on the q, k, v projections
  tie_embeddings: bool = False
  dtype: str = 'float32'       # compute dtype; logits are always returned in fp32
  param_dtype: str = 'float32'
  remat: bool = False          # jax.checkpoint each layer (saves activation memory in training)
  scan_unroll: int = 1         # unroll factor of the scan over layers
  # Hugging Face's rope_scaling dict (as sorted (key, value) pairs; a dict is accepted), e.g.
  # {'rope_type': 'llama3', 'factor': 32.0, ...}; () = plain RoPE. Applies to global layers.
  rope_scaling: tuple = ()
  partial_rotary_factor: float = 1.0   # Phi-3 / Phi-4: RoPE on the first fraction of head_dim
  rope_local_theta: float = 0.0  # Gemma 3: plain RoPE base of sliding layers (0 = as global)
  sliding_window: int = 0      # >0: sliding layers see keys less than this many positions back
  # Per layer, 'full_attention' or 'sliding_attention'; () = all sliding when sliding_window > 0.
  layer_types: tuple = ()
  o_bias: bool = False         # bias on the attention output projection
  mlp_activation: str = 'silu'
  norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w), w initialised at 0
  post_norms: bool = False     # Gemma 2/3: also RMSNorm the attention and MLP outputs
  embed_scale: bool = False    # Gemma: embeddings times sqrt(d_model), in the compute dtype
  query_pre_attn_scalar: float = 0.0   # scores scaled by this^-1/2 (0 = head_dim, as usual)
  attn_softcap: float = 0.0    # Gemma 2: scores -> c * tanh(scores / c) (0 = off)
  final_softcap: float = 0.0   # Gemma 2: logits -> c * tanh(logits / c) (0 = off)

  def __post_init__(self):
    for name in ('rope_scaling', 'layer_types'):
      object.__setattr__(self, name, _frozen(getattr(self, name)))
    self.validate()

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def rotary_dim(self) -> int:
    """How many leading dims of each head RoPE rotates (the rest pass through)."""
    return int(self.resolved_head_dim * self.partial_rotary_factor)

  @property
  def rope_scaling_dict(self) -> dict:
    return dict(self.rope_scaling)

  @property
  def sliding_layers(self) -> tuple:
    """Per layer, whether it attends through the sliding window."""
    if self.layer_types:
      return tuple(t == 'sliding_attention' for t in self.layer_types)
    return (self.sliding_window > 0,) * self.n_layers

  # any(sliding_layers) / all(sliding_layers) without building that n_layers-long tuple (GBs
  # for a mistyped n_layers, before any check on the model's size could run).
  @property
  def any_sliding(self) -> bool:
    return 'sliding_attention' in self.layer_types if self.layer_types else self.sliding_window > 0

  @property
  def all_sliding(self) -> bool:
    return (set(self.layer_types) == {'sliding_attention'} if self.layer_types
            else self.sliding_window > 0)

  def validate(self) -> None:
    """Raises ValueError naming the first offending field."""
    for name in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff',
                 'max_seq_len', 'scan_unroll'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'ModelConfig.{name} must be a positive int, got {value!r}')
    for name in ('head_dim', 'sliding_window'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'ModelConfig.{name} must be an int >= 0 (0 = off / default), '
                         f'got {value!r}')
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
    for name in ('rope_local_theta', 'query_pre_attn_scalar', 'attn_softcap', 'final_softcap'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f'ModelConfig.{name} must be a number >= 0 (0 = off), got {value!r}')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'ModelConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}')
    for name in ('qk_norm', 'qkv_bias', 'tie_embeddings', 'remat', 'o_bias', 'norm_plus_one',
                 'post_norms', 'embed_scale'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'ModelConfig.{name} must be a bool, got {getattr(self, name)!r}')
    if self.mlp_activation not in ACTIVATIONS:
      raise ValueError(f'ModelConfig.mlp_activation must be one of {ACTIVATIONS}, '
                       f'got {self.mlp_activation!r}')
    if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
      raise ValueError(f'ModelConfig.partial_rotary_factor must be in (0, 1] and rotate an even '
                       f'number of dims, got {self.partial_rotary_factor!r} (rotary dim '
                       f'{self.rotary_dim})')
    self._validate_layer_types()
    self._validate_rope_scaling()

  def _validate_layer_types(self):
    if self.layer_types and (len(self.layer_types) != self.n_layers
                             or not set(self.layer_types) <= set(LAYER_TYPES)):
      raise ValueError(f'ModelConfig.layer_types must list n_layers={self.n_layers} entries of '
                       f'{LAYER_TYPES}, got {self.layer_types!r}')
    if self.any_sliding and not self.sliding_window:
      raise ValueError('ModelConfig.layer_types has sliding_attention layers but sliding_window=0')

  def _validate_rope_scaling(self):
    scaling = self.rope_scaling_dict
    if not scaling:
      return
    rope_type = scaling.get('rope_type')
    if rope_type not in ROPE_TYPES:
      raise ValueError(f'ModelConfig.rope_scaling: rope type {rope_type!r} is not implemented; '
                       f'supported rope types: {", ".join(ROPE_TYPES)}')
    required = {'linear': ('factor',), 'dynamic': ('factor', 'original_max_position_embeddings'),
                'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
                           'original_max_position_embeddings'),
                'yarn': ('factor', 'original_max_position_embeddings')}.get(rope_type, ())
    missing = [key for key in required if scaling.get(key) is None]
    if missing:
      raise ValueError(f'ModelConfig.rope_scaling ({rope_type}) lacks {missing}')
    if rope_type == 'dynamic' and self.max_seq_len > scaling['original_max_position_embeddings']:
      # Within the original context dynamic NTK is plain RoPE; beyond it the frequencies would
      # depend on each call's length, which the static rotary tables cannot follow.
      raise ValueError(f'ModelConfig.rope_scaling: dynamic rope is implemented only up to '
                       f'original_max_position_embeddings='
                       f'{scaling["original_max_position_embeddings"]}, but max_seq_len='
                       f'{self.max_seq_len}')
