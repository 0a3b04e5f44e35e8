"""Sweeps: one config expanded over axes of values, each point a normal run in
WORKDIR/KEY=VALUE,..., launched in this process or through submitit, resumable, listable.

    python -m distill.sweep --config=configs/NAME.py[:ARG] --workdir=runs/sweep \
        [--sweep=KEY=V1,V2 ...] [--config.KEY=VALUE ...] [--list] [--launcher=submitit]

A config file declares its sweep next to get_config (see distill.sweep.axes):

    def get_sweep(arg=None):
      return sweep.product(sweep.axis('model.preset', [...]), sweep.axis('seed', [0, 1, 2]))
"""
from distill.sweep.axes import Labelled, axis, parse_axis, product, zip_axes
from distill.sweep.plan import Invocation, make_plan

__all__ = ['Invocation', 'Labelled', 'axis', 'make_plan', 'parse_axis', 'product', 'zip_axes']
