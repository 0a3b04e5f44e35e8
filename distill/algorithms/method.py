"""A method: a registered (rows, objective) pair, bound to a config and checked as a whole.

    spec = MethodSpec('gkd', rows=gkd.MixedRows, objective=divergence.Divergence)
    method = Method(spec, config, run); method.validate()   # before anything compiles

config.algorithm.kwargs is split between the two hooks by the names each lists in DEFAULTS
(a name both list goes to both, e.g. a sampling temperature); a name neither takes is an
error that lists what the method takes.
"""
from __future__ import annotations

import dataclasses

from distill.algorithms import hooks, served, teachers


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  name: str
  rows: type[hooks.Rows]
  objective: type[hooks.Objective]

  @property
  def defaults(self) -> dict:
    """Every kwarg the method takes, with its default."""
    return {**self.rows.DEFAULTS, **self.objective.DEFAULTS}


class Method:
  """The two hooks of one run, with the state and checks that span both."""

  def __init__(self, spec: MethodSpec, config, run):
    self.spec, self.config, self.run = spec, config, run
    rows, objective = spec.rows, spec.objective
    if run.teacher_server is not None:   # config.teacher.server: the hooks' served variants
      rows, objective = served.hooks_for(spec)
    if teachers.is_ensemble(run.teacher_graphdef):   # several teachers (config.teachers)
      rows, objective = teachers.hooks_for(spec, run.teacher_graphdef)
    # The kwargs of the hooks the run uses (a served variant may take more, e.g. k).
    takes = {**rows.DEFAULTS, **objective.DEFAULTS}
    kwargs = dict(config.algorithm.kwargs)
    unknown = sorted(set(kwargs) - set(takes))
    if unknown:
      raise ValueError(f'algorithm {spec.name!r} does not take kwargs {unknown}; it takes '
                       f'{sorted(takes) or "none"}')

    def options(hook):
      return {**hook.DEFAULTS, **{k: v for k, v in kwargs.items() if k in hook.DEFAULTS}}

    self.rows = rows(config, run, options(rows))
    self.objective = objective(config, run, options(objective))

  def validate(self) -> None:
    name, rows, objective = self.spec.name, self.rows, self.objective
    has_teacher = self.run.teacher_params is not None or rows.serves_teacher
    if (rows.needs_teacher or objective.needs_teacher) and not has_teacher:
      raise ValueError(f'algorithm {name!r} needs a teacher: set config.teacher.checkpoint to '
                       'the workdir of a finished teacher run')
    divergence = self.config.loss.divergence
    if objective.accepts is not None and divergence not in objective.accepts:
      raise ValueError(f'algorithm {name!r} minimises {", ".join(objective.accepts)}, not '
                       f'config.loss.divergence={divergence!r}: set it to one of '
                       f'{list(objective.accepts)}')
    if objective.needs_sample and not rows.samples:
      raise ValueError(f'algorithm {name!r}: objective {type(objective).__name__} needs sampled '
                       f'rows, and rows {type(rows).__name__} are not sampled')
    missing = sorted(set(objective.needs_fields) - set(rows.fields))
    if missing:
      raise ValueError(f'algorithm {name!r}: objective {type(objective).__name__} needs row '
                       f'fields {missing} that rows {type(rows).__name__} do not give')
    rows.check()
    objective.check()
    objective.check_rows(rows)

  def init_state(self, optimizer) -> dict:
    """state['algo']: each hook's state, and the objective's own trainables with their
    optimiser state (see distill.train.step.build_step)."""
    state = {'rows': self.rows.init_state(), 'objective': self.objective.init_state()}
    extra = self.objective.init_trainable()
    if extra is not None:
      state['trainable'] = {'params': extra, 'opt_state': optimizer.init(extra)}
    return state

  def train_batches(self, default):
    return self.rows.train_batches(default)

  def after_eval(self, state, eval_metrics: dict):
    rows_state = self.rows.after_eval(state['algo']['rows'], eval_metrics)
    return dict(state, algo=dict(state['algo'], rows=rows_state))
