"""`make quickstart` end to end in small mode: four table rows, the report and its plot."""
import os

from tests.helpers import run_cli


def test_quickstart_small_writes_table_and_report(tmp_path):
  proc = run_cli(str(tmp_path), '--small', module='distill.quickstart')
  rows = [line for line in proc.stdout.splitlines() if line.startswith('| ') and '---' not in line]
  assert [r.split(' | ')[0] for r in rows] == [
      '| model', '| teacher', '| student (ground truth only)',
      '| student (supervised KD 3 steps, then on-policy GKD λ=0.5 3 steps)',
      '| student (distilled off-policy, supervised KD)'], proc.stdout
  # The on-policy student starts from the KD warm-up run's final params.
  assert os.path.isdir(tmp_path / 'student_gkd_warmup' / 'params')
  report = (tmp_path / 'report.md').read_text()
  assert all(r in report for r in rows[1:])
  assert (tmp_path / 'loss_curves.png').stat().st_size > 10_000
