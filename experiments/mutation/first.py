"""pytest plugin (`-p experiments.mutation.first`): runs the tests named in $MUTATION_FIRST
(one test id or id prefix per line) before the others, in that order, so that `pytest -x`
stops at the test expected to catch a mutant before any slower one runs. It only reorders."""
import os


def pytest_collection_modifyitems(session, config, items):
  del session, config
  prefixes = [p for p in os.environ.get('MUTATION_FIRST', '').splitlines() if p]

  def rank(item):
    for i, prefix in enumerate(prefixes):
      if item.nodeid.startswith(prefix):
        return i
    return len(prefixes)

  items.sort(key=rank)   # stable: the rest keep pytest's order
