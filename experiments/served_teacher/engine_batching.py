"""The engine alone, without HTTP: scoring rows/s with and without server-side batching.

    .venv/bin/python experiments/served_teacher/engine_batching.py --preset=tiny

8 threads score 128 arithmetic rows as requests of 4 rows (k=16) straight through
distill.serve.engine.Engine.score, 4 times per setting; prints rows/s per repeat and the
batcher's forward calls so far (each new batch shape compiles once, so the first repeats
of the batched engine include compilation).
"""
import argparse
import concurrent.futures
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (this folder's benchmark: teacher export, rows)

from distill.serve.engine import Engine  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--preset', default='tiny')
  p.add_argument('--workdir', default='/tmp/served-bench-engine')
  args = p.parse_args()
  teacher = bench.export_teacher(os.path.join(args.workdir, 'teacher'), args.preset)
  seqs = bench.sequences(128)
  chunks = [seqs[i:i + 4] for i in range(0, len(seqs), 4)]
  for wait_ms in (0.0, 5.0):
    engine = Engine(teacher, batch_wait_ms=wait_ms)
    for repeat in range(4):
      start = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda chunk: engine.score(chunk, 16), chunks))
      calls = engine.batcher.batches_run if engine.batcher else len(chunks) * (repeat + 1)
      print(f'batch_wait_ms={wait_ms:g} repeat {repeat}: '
            f'{len(seqs) / (time.perf_counter() - start):.0f} rows/s, forward calls {calls}',
            flush=True)


if __name__ == '__main__':
  main()
