"""The schema every experiment config starts from, and its validation.

Experiment files in configs/ call `base_config()` and change fields; the returned
ConfigDict is locked, so a misspelled key fails at once with the close matches named
(ml_collections does this for both config files and `--config.a.b=value` overrides).
"""
from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from distill import losses
from distill.models import ModelConfig
from distill.train import nonfinite
from distill.models.config import DTYPES
from distill.models.layers import REMAT_POLICIES
from distill.parallel.mesh import LOGICAL_AXES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.checkpoint_steps = 200      # save every N steps (and at the end)
  c.keep_checkpoints = 2        # the last N steps
  # Also keep the `count` best steps by a logged metric, e.g. 'eval/ce' (logged at steps that
  # are multiples of eval_steps) or 'loss'; '' keeps only the last N.
  c.keep_best = ml_collections.ConfigDict({'metric': '', 'mode': 'min', 'count': 1})
  c.log_steps = 50
  c.eval_steps = 0              # evaluate every N steps; 0: only at the end
  # A step whose loss or gradient is not finite: 'stop' the run naming it, or 'skip' its
  # update and count it (distill.train.nonfinite).
  c.nonfinite = 'stop'

  # What is trained: 'teacher' fits the teacher to ground truth (cross-entropy);
  # 'student' distils from a teacher checkpoint (or trains on ground truth when
  # loss.kd_weight == 0 and no teacher is given).
  c.role = 'student'

  c.task = ml_collections.ConfigDict()
  c.task.name = 'arithmetic'
  c.task.kwargs = ml_collections.ConfigDict(type_safe=False)
  c.task.prompt_len = 0         # 0: the smallest length that fits every example of the task
  c.task.completion_len = 0

  c.data = ml_collections.ConfigDict()
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  # Micro-batches per step, inside the jitted step: the same update as the whole batch at
  # once, with the activations of batch_size / grad_accum_steps rows.
  c.data.grad_accum_steps = 1

  # The tokenizer: '' for the embedded tasks' character tokenizer, or a Hugging Face
  # folder holding tokenizer.json (and tokenizer_config.json for special tokens).
  c.tokenizer = ''

  c.model = ml_collections.ConfigDict()
  c.model.preset = 'student-500k'
  # Start from these weights instead of a random init: a finished run's workdir (e.g. a
  # student trained on ground truth, to distil after supervised training) or a Hugging
  # Face folder. The checkpoint's architecture wins over the preset.
  c.model.init_from = ''
  # Every ModelConfig field can replace the preset's value (None keeps the preset's),
  # e.g. --config.model.d_ff=512 or --config.model.dtype=bfloat16.
  for field in dataclasses.fields(ModelConfig):
    c.model[field.name] = config_dict.placeholder(field.type)
  # What each layer keeps for the backward pass: one of layers.REMAT_POLICIES ('' = model.remat:
  # 'full' if True, else 'named'). Not a ModelConfig field: it changes memory and time, not
  # results, so it is no part of a run's identity (a run resumes under another policy).
  c.model.remat_policy = ''

  c.teacher = ml_collections.ConfigDict()
  c.teacher.checkpoint = ''     # a finished run's workdir, or a Hugging Face checkpoint folder
  c.teacher.preset = ''         # must match the checkpoint's preset when given
  # The teacher's own rules over config.mesh.rules (None: as the student's), e.g.
  # --config.teacher.sharding.embed=fsdp,tensor for a teacher larger than its student.
  c.teacher.sharding = _logical_axis_placeholders()
  c.teacher.dtype = ''          # '' keeps the checkpoint's; 'bfloat16': bf16 params and compute
  # The teacher's own tokenizer when it differs from the student's: a Hugging Face folder
  # (tokenizer.json) or 'char' (the embedded tasks' character tokenizer). Only cross-tokenizer
  # methods take it (algorithm.name='cross_tokenizer', distill.algorithms.cross_tokenizer).
  c.teacher.tokenizer = ''
  # A teacher on a server speaking vLLM's completions protocol ('http://host:port':
  # python -m distill.serve, or vllm serve): cached_teacher, topk_online and seqkd take its
  # top-k / generations (distill.algorithms.served); onpolicy_rkl, gkd and distillm have the
  # student's samples scored by it each step (distill.algorithms.served_scoring: gkd and
  # distillm then minimise top-k forward KL, kwargs k and tail). With teacher.checkpoint, the
  # server must serve exactly those weights (fingerprints compared).
  c.teacher.server = ''
  c.teacher.server_model = ''   # the served model's name ('': the server's only model)
  c.teacher.fingerprint = ''    # the model fingerprint the server must report ('': any)
  c.teacher.client = ml_collections.ConfigDict(dict(    # distill.teacher_client.ClientOptions
      timeout_s=120.0, retries=5, backoff_s=0.5, max_backoff_s=30.0, rows_per_request=32,
      concurrency=4))

  # Several teachers (distill.algorithms.teachers): config.teacher.checkpoint is the first,
  # teachers.more the others (finished runs' workdirs or Hugging Face folders, or with
  # teacher.server the other servers' URLs: distill.teacher_pool; same tokenizer
  # and vocabulary). Either mixed per token, p = sum_i w_i p_i (teachers.weights, the first
  # teacher's first, summing to 1), or routed per row (teachers.routes: each teacher's value
  # of the rows' route field, e.g. a JSONL source's task.kwargs.route_field). Each teacher's
  # KL to the student is logged as teacher_kl/NAME (NAME: its folder's name).
  c.teachers = ml_collections.ConfigDict()
  c.teachers.more = ()
  c.teachers.weights = ()
  c.teachers.routes = ()

  c.loss = ml_collections.ConfigDict()
  c.loss.divergence = 'forward_kl'
  c.loss.kd_weight = 1.0
  c.loss.ce_weight = 0.0
  c.loss.temperature = 1.0
  c.loss.temperature_squared_scale = False
  c.loss.hparams = ml_collections.ConfigDict(type_safe=False)  # e.g. beta, alpha
  # >0: the memory-flat chunked loss, this many tokens' logits at a time (same value and
  # gradient as 0, the plain loss over full [B, T, V] logits). 512 by default: faster than
  # plain at the benchmark shape on CPU (experiments/bench/perf_notes.md §5); on a GPU, plain
  # or larger chunks can be faster when [B, T, V] fits.
  c.loss.chunk_size = 512
  c.loss.reduction = 'token_mean'

  c.algorithm = ml_collections.ConfigDict()
  c.algorithm.name = 'supervised'
  c.algorithm.kwargs = ml_collections.ConfigDict(type_safe=False)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.clip_norm = 1.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Logical axis -> mesh axes of the student's params (and optimiser state), e.g.
  # --config.mesh.rules.embed='' (replicated: data-parallel student) or 'fsdp,tensor'.
  # None keeps distill.parallel.mesh.DEFAULT_RULES.
  c.mesh.rules = _logical_axis_placeholders()
  # Memory one device has for the run (GB); 0: what the device reports (GPU/TPU; CPU has no
  # figure and is not checked). The compiled step must fit before the first step runs.
  c.mesh.device_memory_gb = 0.0

  # Quantization-aware distillation: '' off, or a GGUF file type of the export (q8_0, q6_k,
  # q5_k_m, q4_k_m, q4_0, f16, ...): the student's matrices are fake-quantized in the step to
  # exactly what that GGUF will hold (per-tensor mix and fallbacks as the export), with
  # straight-through gradients to fp32 master weights (distill.quant), and evaluated so.
  c.quant = ml_collections.ConfigDict({'type': ''})

  c.eval = ml_collections.ConfigDict()
  c.eval.generate = True        # greedy decoding for task accuracy
  c.eval.max_batches = 4        # eval batches of data.eval_batch_size rows

  c.wandb = ml_collections.ConfigDict()
  c.wandb.mode = 'auto'         # auto: online with an API key, else offline; or 'disabled'
  c.wandb.project = 'distill'
  c.wandb.group = ''
  c.wandb.name = ''

  # What the user sees at each log (distill.train.monitor): the teacher's share of the step
  # time; with `probe` (two small programs compiled beside the step) the student's entropy and
  # its KL to the teacher on the logged batch; one-time alarms when the entropy falls below
  # entropy_floor x its first logged value, or the KL (probe_kl, else loss) rises above
  # kl_spike x the median of its last kl_window logged values.
  c.monitor = ml_collections.ConfigDict(dict(probe=True, entropy_floor=0.25, kl_spike=3.0,
                                             kl_window=10))

  c.progress_bar = True
  c.lock()
  # Free-form keyword dicts stay open so experiment files can add their own keys.
  for kwargs in (c.task.kwargs, c.loss.hparams, c.algorithm.kwargs):
    kwargs.unlock()
  return c


def _logical_axis_placeholders() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({name: config_dict.placeholder(str) for name in LOGICAL_AXES})


def validate(config, *, model_max_seq_len: int | None = None, data_parallel: int | None = None):
  """Checks values that would otherwise fail late (inside compilation) or silently."""
  def positive(name, value):
    if not value > 0:
      raise ValueError(f'config.{name} must be positive, got {value!r}')

  positive('total_steps', config.total_steps)
  positive('checkpoint_steps', config.checkpoint_steps)
  positive('log_steps', config.log_steps)
  positive('keep_checkpoints', config.keep_checkpoints)
  positive('keep_best.count', config.keep_best.count)
  if config.keep_best.mode not in ('min', 'max'):
    raise ValueError(f"config.keep_best.mode must be 'min' or 'max', got {config.keep_best.mode!r}")
  positive('data.batch_size', config.data.batch_size)
  positive('data.eval_batch_size', config.data.eval_batch_size)
  positive('data.grad_accum_steps', config.data.grad_accum_steps)
  if config.model.remat_policy not in ('',) + tuple(REMAT_POLICIES):
    raise ValueError(f'config.model.remat_policy: unknown {config.model.remat_policy!r}; valid: '
                     f'{", ".join(REMAT_POLICIES)} (\'\' = as model.remat)')
  m = config.monitor
  if not (0 < m.entropy_floor < 1 and m.kl_spike > 1 and m.kl_window >= 3):
    raise ValueError(f'config.monitor needs 0 < entropy_floor < 1, kl_spike > 1 and '
                     f'kl_window >= 3, got {m.entropy_floor}, {m.kl_spike}, {m.kl_window}')
  if config.teacher.dtype not in ('',) + tuple(DTYPES):
    raise ValueError(f'config.teacher.dtype must be one of {DTYPES} (or \'\' for the '
                     f'checkpoint\'s), got {config.teacher.dtype!r}')
  positive('optimizer.learning_rate', config.optimizer.learning_rate)
  for name in ('prompt_len', 'completion_len'):
    if config.task[name] < 0:
      raise ValueError(f'config.task.{name} must be positive (or 0 for the task\'s own), '
                       f'got {config.task[name]}')
  positive('loss.temperature', config.loss.temperature)
  if config.eval_steps < 0:
    raise ValueError(f'config.eval_steps must be >= 0, got {config.eval_steps}')
  if config.optimizer.warmup_steps < 0:
    raise ValueError(f'config.optimizer.warmup_steps must be >= 0, got {config.optimizer.warmup_steps}')
  if config.nonfinite not in nonfinite.POLICIES:
    raise ValueError(f'config.nonfinite must be one of {nonfinite.POLICIES}, got '
                     f'{config.nonfinite!r}')
  from distill.quant import student as quant_student   # distill.quant imports the models
  quant_student.check_type(config.quant.type)
  if config.role not in ('teacher', 'student'):
    raise ValueError(f"config.role must be 'teacher' or 'student', got {config.role!r}")
  if config.loss.reduction not in losses.MODES:
    raise ValueError(f'config.loss.reduction: unknown {config.loss.reduction!r}; '
                     f'valid: {", ".join(losses.MODES)}')
  if config.loss.kd_weight < 0 or config.loss.ce_weight < 0:
    raise ValueError('config.loss.kd_weight and ce_weight must be >= 0')
  if (config.role == 'student' and config.loss.kd_weight > 0 and not config.teacher.checkpoint
      and not config.teacher.server):
    raise ValueError('config.loss.kd_weight > 0 needs a teacher: set config.teacher.checkpoint '
                     '(or config.teacher.server) '
                     'to the workdir of a finished teacher run')
  seq_len = config.task.prompt_len + config.task.completion_len
  if model_max_seq_len is not None and seq_len > model_max_seq_len:
    raise ValueError(f'sequence length task.prompt_len + task.completion_len = {seq_len} exceeds '
                     f"the model's max_seq_len {model_max_seq_len}")
  if data_parallel is not None:
    for name in ('batch_size', 'eval_batch_size'):
      if config.data[name] % data_parallel:
        raise ValueError(f'config.data.{name}={config.data[name]} is not divisible by the '
                         f'data-parallel size {data_parallel} (mesh data x fsdp)')
    if config.data.batch_size % (data_parallel * config.data.grad_accum_steps):
      raise ValueError(f'config.data.batch_size={config.data.batch_size} is not divisible by '
                       f'the data-parallel size {data_parallel} x data.grad_accum_steps='
                       f'{config.data.grad_accum_steps}: each micro-batch must split evenly '
                       'over the devices')


def parse_options(arg: str | None, allowed: dict[str, str]) -> set[str]:
  """Splits a config file's ARG ('small,scratch') and rejects unknown options by name."""
  options = {o for o in (arg or '').split(',') if o}
  unknown = options - set(allowed)
  if unknown:
    described = '; '.join(f'{k}: {v}' for k, v in allowed.items())
    raise ValueError(f'unknown config option(s) {sorted(unknown)}; valid: {described}')
  return options


def make_small(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The 'small' mode shared by experiment configs: tiny model, a few steps, seconds on CPU."""
  c.model.preset = 'tiny'
  c.data.batch_size = 16
  c.data.eval_batch_size = 16
  c.eval.max_batches = 1
  c.total_steps = 6
  c.checkpoint_steps = 3
  c.log_steps = 2
  c.optimizer.warmup_steps = 2
  c.progress_bar = False
  c.monitor.probe = False   # smoke runs are mostly compile time; the probe would add two programs
  return c


def model_overrides(config) -> dict:
  """The ModelConfig fields the config sets explicitly (the rest come from the preset)."""
  return {k: v for k, v in config.model.items()
          if k not in ('preset', 'init_from', 'remat_policy') and v is not None}
