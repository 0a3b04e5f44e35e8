"""`make quickstart` end to end in small mode: four table rows, the report and its plot."""
import json

from tests.helpers import run_cli


def test_quickstart_small_writes_table_and_report(tmp_path):
  proc = run_cli(str(tmp_path), '--small', module='distill.quickstart')
  rows = [line for line in proc.stdout.splitlines() if line.startswith('| ') and '---' not in line]
  assert [r.split(' | ')[0] for r in rows] == [
      '| model', '| teacher', '| student, ground truth only (6 steps)',
      '| student, off-policy supervised KD (6 steps)',
      '| student, KD then on-policy GKD λ=0.5 (6 + 3 steps)',
      '| student, KD then more KD (6 + 3 steps; control)'], proc.stdout
  # The GKD phase really ran on-policy batches, starting from the KD student's final params.
  gkd_metrics = [json.loads(line) for line in open(tmp_path / 'student_kd_then_gkd' /
                                                    'metrics.jsonl')]
  assert any(r.get('on_policy', 0) > 0 for r in gkd_metrics), gkd_metrics
  assert json.loads((tmp_path / 'student_kd_then_gkd' / 'config.json').read_text())[
      'model']['init_from'] == str(tmp_path / 'student_kd')
  report = (tmp_path / 'report.md').read_text()
  assert all(r in report for r in rows[1:])
  assert (tmp_path / 'loss_curves.png').stat().st_size > 10_000
