"""The one step builder: a method's two hooks turned into a pure, jitted train step.

    step_fn = make_step(config, run, method, graphdef, shardings, optimizer)
    state, metrics = step_fn(state, teacher_params, batch)

`build_step` alone owns what every method shares: the step's rng (the run's key folded with
the step, so a resumed run draws the same numbers), `jax.grad`, the optimiser update of the
student and of any parameters trained beside it, the (sum, count) metric format and, in
`make_step`, the shardings and the donated state. A method contributes only
  rows.draw(...)        the rows this step trains on (distill.algorithms.hooks.Rows), and
  objective.loss(...)   what is minimised on them (distill.algorithms.hooks.Objective).
The teacher is a frozen input of the same compiled step, so no [B, T, V] teacher logits
ever cross a jit boundary. A served teacher scoring the student's own samples splits the
step in two (`HostScoredStep`: draw, the rows scored on the host, update); only the rows
and the server's top-k / sampled-token log-probs cross the boundary.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from distill.algorithms import divergence, hooks
from distill.parallel import activations
from distill.parallel import mesh as mesh_lib
from distill.quant import student as quant
from distill.train import accumulate
from distill.train import nonfinite


def make_context(config, run, student_graphdef, optimizer) -> hooks.StepContext:
  return hooks.StepContext(
      student_graphdef=student_graphdef, teacher_graphdef=run.teacher_graphdef,
      optimizer=optimizer,
      token_fn=divergence.make_token_fn(config, run.teacher_params is not None),
      chunk_size=config.loss.chunk_size, reduction=config.loss.reduction,
      student_softcap=run.model_config.final_softcap,
      teacher_softcap=run.teacher_config.final_softcap if run.teacher_config else 0.0)


def step_rng(state):
  """Per-step randomness: the run's key folded with the step (resumes identically)."""
  return jax.random.fold_in(state['rng'], state['step'])


def apply_update(optimizer, grads, opt_state, params):
  """(params, opt_state) after one optimiser update with `grads`."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def build_phases(ctx: hooks.StepContext, method, *, skip_nonfinite: bool = False,
                 grad_accum_steps: int = 1, quant_plan=None) -> tuple[Callable, Callable]:
  """The pure step of `method` as its two parts (see build_step for the options):
    draw(state, teacher_params, batch) -> Drawn             this step's rows (no update), and
    update(state, teacher_params, drawn) -> (state, metrics)  the objective's grads, applied.
  """
  rows_hook, objective = method.rows, method.objective

  def quantized_params(state):
    return jax.lax.stop_gradient(quant.fake_quantize(quant_plan, state['params']))

  def draw(state, teacher_params, batch):
    inputs = hooks.StepInputs(params=quantized_params(state), teacher_params=teacher_params,
                              state=state['algo']['rows'], rng=step_rng(state),
                              step=state['step'])
    return rows_hook.draw(ctx, inputs, batch)

  def update(state, teacher_params, drawn):
    algo = state['algo']
    quantized = quantized_params(state)
    trainable = {'params': state['params']}
    if 'trainable' in algo:
      trainable['extra'] = algo['trainable']['params']

    def loss_fn(trainable, prepared, drawn):
      params = trainable['params']
      if quant_plan is not None:
        params = quant.straight_through(params, quantized)
      return objective.loss(ctx, params, trainable.get('extra'), prepared, drawn,
                            algo['objective'])

    def grads_of(drawn):   # of all the rows, or of one micro-batch (distill.train.accumulate)
      prepared = objective.prepare(ctx, teacher_params, drawn, algo['objective'])
      return jax.grad(loss_fn, has_aux=True)(trainable, prepared, drawn)

    grads, metrics = accumulate.over_micro_batches(grads_of, drawn, grad_accum_steps,
                                                   ctx.reduction)
    new_algo = dict(algo, rows=drawn.state,
                    objective=objective.update_state(algo['objective'], metrics, state['step']))
    if 'trainable' in algo:
      # Its own optimiser state (same settings as the student's): clipped on its own.
      extra, extra_opt_state = apply_update(ctx.optimizer, grads['extra'],
                                            algo['trainable']['opt_state'],
                                            algo['trainable']['params'])
      new_algo['trainable'] = {'params': extra, 'opt_state': extra_opt_state}
    params, opt_state = apply_update(ctx.optimizer, grads['params'], state['opt_state'],
                                     state['params'])
    metrics = {**drawn.metrics, **metrics,
               'grad_norm': (optax.tree.norm(grads['params']), jnp.float32(1.0))}
    new_state = dict(state, params=params, opt_state=opt_state, step=state['step'] + 1,
                     algo=new_algo)
    if skip_nonfinite:
      new_state = nonfinite.keep_state_unless_finite(state, new_state, metrics)
    return new_state, metrics

  return draw, update


def build_step(ctx: hooks.StepContext, method, **options) -> Callable:
  """The pure step(state, teacher_params, batch) -> (state, metrics) of `method`.

  grad_accum_steps (config.data.grad_accum_steps): the gradient of the whole batch summed
  over that many micro-batches (distill.train.accumulate).

  skip_nonfinite (config.nonfinite='skip'): a step with a non-finite metric keeps the old
  state (distill.train.nonfinite).

  quant_plan (config.quant.type, distill.quant.student.quant_plan): the rows are drawn and the
  loss computed with the student's weights as that GGUF type stores them; the gradient reaches
  the fp32 master weights straight through.

  state['algo'] holds {'rows': …, 'objective': …} and, when the objective trains parameters
  of its own, 'trainable': {'params': …, 'opt_state': …} (see Method.init_state).
  """
  draw, update = build_phases(ctx, method, **options)

  def step(state, teacher_params, batch):
    return update(state, teacher_params, draw(state, teacher_params, batch))

  return step


class HostScoredStep:
  """The step of a rows hook with `host_scored` (a served teacher scoring the student's
  samples): jitted `draw`, the drawn rows to the host, `rows.score_on_host` adds the
  teacher's fields (an HTTP request), then jitted `update` with the state donated. Called
  like the one-phase step; `lower` gives the update phase's lowering, whose memory is the
  step's (distill.parallel.memory.checked_step): the draw phase holds no gradients."""

  def __init__(self, draw, update, rows_hook, mesh):
    self.draw, self.update, self.rows_hook, self.mesh = draw, update, rows_hook, mesh

  def _with_fields(self, drawn, fields: dict):
    return drawn._replace(rows={**drawn.rows, **fields})

  def __call__(self, state, teacher_params, batch):
    drawn = self.draw(state, teacher_params, batch)
    scored = self.rows_hook.score_on_host(jax.device_get(drawn.rows))
    fields = {name: jax.device_put(value, mesh_lib.batch_sharding(self.mesh, value.ndim))
              for name, value in scored.items()}
    return self.update(state, teacher_params, self._with_fields(drawn, fields))

  def lower(self, state, teacher_params, batch):
    drawn = self.draw.lower(state, teacher_params, batch).compile().out_info
    B, T = batch['tokens'].shape
    fields = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.batch_sharding(
        self.mesh, len(shape))) for name, (shape, dtype) in self.rows_hook.host_fields(B, T).items()}
    return self.update.lower(state, teacher_params, self._with_fields(drawn, fields))


def make_step(config, run, method, graphdef, shardings, optimizer):
  """build_step jitted with the state's shardings, the state donated (updated in place); a
  HostScoredStep of the two phases when the rows hook scores its rows on the host."""
  ctx = make_context(config, run, graphdef, optimizer)
  teacher_shardings = jax.tree.map(lambda x: x.sharding, run.teacher_params)
  options = dict(skip_nonfinite=config.nonfinite == 'skip',
                 grad_accum_steps=config.data.grad_accum_steps,
                 quant_plan=quant.quant_plan(run.model_config, config.quant.type))
  # Traced under the run's layout: activations constrained by the student's rules at the
  # layer boundaries, the configured remat policy (distill.parallel.activations).
  layout = activations.Layout(run.mesh, run.rules, config.model.remat_policy)
  in_shardings = (shardings, teacher_shardings, mesh_lib.batch_sharding(run.mesh))
  if method.rows.host_scored:
    draw, update = build_phases(ctx, method, **options)
    return HostScoredStep(
        jax.jit(activations.traced_under(layout, draw), in_shardings=in_shardings),
        # The drawn rows keep the draw phase's shardings; the state is donated here.
        jax.jit(activations.traced_under(layout, update), out_shardings=(shardings, None),
                donate_argnums=(0,)),
        method.rows, run.mesh)
  return jax.jit(activations.traced_under(layout, build_step(ctx, method, **options)),
                 in_shardings=in_shardings, out_shardings=(shardings, None),
                 donate_argnums=(0,))
