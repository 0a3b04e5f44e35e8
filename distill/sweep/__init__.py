"""Sweeps: one config expanded over axes of values, each combination a normal run, the final
metrics aggregated into WORKDIR/results.md and results.json (see distill.sweep.run).

    python -m distill.sweep --config=configs/arithmetic_cached.py --workdir=/tmp/sizes \
        --sweep=model.preset=student-100k,student-500k,student-2m [--sweep=KEY=V1,V2 ...] \
        [--config.KEY=VALUE ...]
"""
from distill.sweep.run import expand, markdown_table, parse_axis, run_sweep

__all__ = ['expand', 'markdown_table', 'parse_axis', 'run_sweep']
