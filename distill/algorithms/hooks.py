"""The two hooks every method is made of, and what passes between them.

A method (distill.algorithms.register) is a pair:
  Rows       where this step's training rows come from: the dataset, a teacher cache, the
             teacher's or the student's samples, interleaved proposals, a replay buffer, a
             mixture of these. Runs inside the jitted step (`draw`) and may prepare data on
             the host before training (`train_batches`) or, between the step's two phases,
             add fields to the drawn rows (`score_on_host`: a served teacher's scores).
  Objective  what is minimised on those rows: a divergence through the chunked loss, a
             policy-gradient surrogate, a top-k form, added hidden-state terms.
The step builder (distill.train.step) owns everything else: the rng, `jax.grad`, the
optimiser update, the (sum, count) metric format, shardings and donation.

Both hooks take their options from config.algorithm.kwargs: each lists the names it takes
with their defaults in DEFAULTS and checks its values in `check()` (raising
`self.kwarg_error`), before anything is compiled. Both may keep state in the checkpoint
(`init_state`): state['algo']['rows'] and state['algo']['objective'].
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, NamedTuple

import optax
from flax import nnx

from distill.models.layers import softcap

ROW_KEYS = ('tokens', 'targets', 'input_mask', 'loss_mask')


def is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class StepContext:
  """Everything static the step closes over (graph definitions, optimiser, loss)."""
  student_graphdef: Any
  teacher_graphdef: Any | None
  optimizer: optax.GradientTransformation
  token_fn: Callable          # (student_logits_NxV, teacher_logits_NxV | None, targets_N) -> N
  chunk_size: int = 0         # 0: plain loss over full logits
  reduction: str = 'token_mean'
  # Gemma 2's final-logit soft-capping (0 = off): the losses form logits from hidden states
  # and the output projection themselves, so they apply it (`capped`).
  student_softcap: float = 0.0
  teacher_softcap: float = 0.0


def capped(token_fn, ctx: StepContext):
  """token_fn applied to soft-capped logits, as each model's own forward pass produces them."""
  if not (ctx.student_softcap or ctx.teacher_softcap):
    return token_fn

  def cap(logits, limit):
    return logits if logits is None or not limit else softcap(logits, limit)

  def capped_fn(student_logits_NxV, teacher_logits_NxV, *rest, **kwargs):
    return token_fn(cap(student_logits_NxV, ctx.student_softcap),
                    cap(teacher_logits_NxV, ctx.teacher_softcap), *rest, **kwargs)

  return capped_fn


def model_outputs(graphdef, params, batch):
  """Final hidden states and the output projection (logits are formed by the loss)."""
  model = nnx.merge(graphdef, params)
  hidden_BxTxD = model.hidden_states(batch['tokens'], batch['input_mask'])
  return hidden_BxTxD, model.output_projection()


class StepInputs(NamedTuple):
  """What a Rows hook may read in the step (all arrays; no gradient flows through them)."""
  params: Any                 # the student's current params
  teacher_params: Any         # None without a teacher
  state: Any                  # this rows hook's state (init_state's structure)
  rng: Any                    # this step's key (the run's key folded with the step)
  step: Any                   # int32 scalar: steps done before this one


class Drawn(NamedTuple):
  """What a Rows hook hands the objective for one step."""
  rows: dict                  # [B, T] fields of the batch layout (ROW_KEYS, and any extra)
  state: Any                  # the rows hook's state after this step ({} when none)
  metrics: dict               # name -> (sum, count) pairs the rows hook reports
  sample: dict | None = None  # the generation's [B, N] outputs when the rows were sampled


class Hook:
  """Options (config.algorithm.kwargs) and checkpointed state common to both hooks."""
  DEFAULTS: dict = {}
  needs_teacher = True

  def __init__(self, config, run, options: dict):
    self.config = config
    self.run = run            # distill.train.run.Run: tokenizer, task, mesh, models
    self.options = options    # DEFAULTS updated with the kwargs this hook takes

  def kwarg_error(self, name: str, problem: str) -> ValueError:
    return ValueError(f'config.algorithm.kwargs.{name} {problem} (algorithm '
                      f'{self.config.algorithm.name!r})')

  def positive_int(self, name: str) -> int:
    value = self.options[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise self.kwarg_error(name, f'must be an int >= 1, got {value!r}')
    return value

  def real_in(self, name: str, low: float, high: float) -> float:
    value = self.options[name]
    if not is_real(value) or not low <= value <= high:
      raise self.kwarg_error(name, f'must be a number in [{low:g}, {high:g}], got {value!r}')
    return value

  def boolean(self, name: str) -> bool:
    if not isinstance(self.options[name], bool):
      raise self.kwarg_error(name, f'must be True or False, got {self.options[name]!r}')
    return self.options[name]

  def check(self) -> None:
    """Checks this hook's options and the config; runs before anything compiles."""

  def init_state(self) -> Any:
    return {}


class Rows(Hook):
  """Dataset rows as they come (the default): supervised KD, or CE without a teacher."""
  needs_teacher = False
  samples = False             # draw() returns Drawn.sample (the rows were generated)
  serves_teacher = False      # the teacher comes from config.teacher.server (served.py)
  # The step runs in two phases with score_on_host between them (a served teacher scoring
  # the drawn rows: distill.algorithms.served_scoring, distill.train.step.HostScoredStep).
  host_scored = False
  fields: tuple[str, ...] = ROW_KEYS

  def train_batches(self, default):
    """The host-side source of batches (default: the task's dataset iterator)."""
    return default

  def draw(self, ctx, inputs: StepInputs, batch: dict) -> Drawn:
    """This step's rows from the host's batch (pure, inside the jitted step)."""
    del ctx
    return Drawn({k: batch[k] for k in self.fields}, inputs.state, {})

  def score_on_host(self, rows: dict) -> dict:
    """With host_scored: the fields added on the host to this step's drawn rows (numpy
    [B, T] rows in, numpy arrays [B, T, ...] out, as host_fields lists them)."""
    raise NotImplementedError

  def host_fields(self, batch_size: int, seq_len: int) -> dict:
    """With host_scored: {name: (shape, dtype)} of score_on_host's fields."""
    raise NotImplementedError

  def after_eval(self, state, eval_metrics: dict):
    """Host-side reaction to validation metrics (e.g. DistiLLM's schedule)."""
    del eval_metrics
    return state


class Objective(Hook):
  """What is minimised on the rows. Subclasses define `loss`."""
  accepts: tuple[str, ...] | None = None    # divergences it can minimise; None: any
  needs_sample = False                      # needs Drawn.sample (sampled rows)
  needs_fields: tuple[str, ...] = ROW_KEYS  # row fields it reads

  def init_trainable(self):
    """Parameters trained beside the student but not part of it (e.g. projections), or None.

    The step builder differentiates them with the student's and updates them with an
    optimiser of the same settings and a separate state (clipped on their own).
    """
    return None

  def prepare(self, ctx, teacher_params, drawn: Drawn, state):
    """What `loss` needs that takes no gradient, computed outside jax.grad.

    By default the teacher's params, so the teacher runs inside `loss` next to the student;
    policy-gradient objectives score the sampled tokens with the teacher here instead.
    """
    del ctx, drawn, state
    return teacher_params

  def loss(self, ctx, params, trainable, prepared, drawn: Drawn, state):
    """(scalar to differentiate, metrics as (sum, count) pairs); pure, inside jax.grad.

    params: the student's; trainable: init_trainable()'s current values (or None).
    """
    raise NotImplementedError

  def check_rows(self, rows: Rows) -> None:
    """Checks that the rows hook it is paired with gives what it needs (before compiling)."""

  def update_state(self, state, metrics: dict, step):
    """The objective's state after a step (e.g. TAID's interpolation); pure."""
    del metrics, step
    return state
