"""Property-based fuzzing of what users hand the framework: config overrides and data rows.

Every case must end in a correct result or a clear error (a user error naming the config
field, or the file and line) — never an exception from deep inside JAX or NumPy. The cases
(strategies and checks) are in tests/fuzz_cases.py; `python -m experiments.faults.fuzz` runs
them with many more examples and counts how each ended."""
import os

from hypothesis import HealthCheck, assume, given, settings

from tests import fuzz_cases as cases

FUZZ = settings(max_examples=int(os.environ.get('DISTILL_FUZZ_EXAMPLES', 40)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(overrides=cases.config_overrides)
def test_fuzzed_config_overrides_end_in_a_run_or_an_error_naming_the_field(overrides):
  assert cases.check_config_overrides(overrides) in (cases.ACCEPTED, cases.CLEAR_ERROR)


@FUZZ
@given(lines=cases.jsonl_lines)
def test_fuzzed_jsonl_rows_end_in_examples_or_an_error_naming_file_and_line(lines, tmp_path):
  assert cases.check_jsonl_lines(lines, str(tmp_path)) in (cases.ACCEPTED, cases.CLEAR_ERROR)


@FUZZ
@given(rows=cases.parquet_rows)
def test_fuzzed_parquet_rows_end_in_examples_or_an_error_naming_file_and_row(rows, tmp_path):
  outcome = cases.check_parquet_rows(rows, str(tmp_path))
  assume(outcome != cases.UNBUILDABLE)   # not an input a user could hand us
  assert outcome in (cases.ACCEPTED, cases.CLEAR_ERROR)
