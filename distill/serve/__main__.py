"""python -m distill.serve --model=WORKDIR_OR_HF_FOLDER --port=N: a teacher over vLLM's protocol.

    python -m distill.serve --model=runs/teacher --port=8000 --max-logprobs=64
    curl localhost:8000/v1/models
    curl localhost:8000/v1/completions -d '{"prompt": [[5, 9, 3]], "max_tokens": 0,
                                            "echo": true, "prompt_logprobs": 16}'

Students train against it with `--config.teacher.server=http://HOST:8000` (BUILD.md).
"""
from __future__ import annotations

import argparse

from distill.serve.engine import Engine
from distill.serve.http import TeacherServer


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m distill.serve', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', required=True, help="a finished run's workdir or a Hugging Face folder")
  p.add_argument('--tokenizer', default=None,
                 help="'char' or an HF folder (default: the model folder's, or the run's)")
  p.add_argument('--served-model-name', default=None, help='the model id (default: --model)')
  p.add_argument('--host', default='127.0.0.1')
  p.add_argument('--port', type=int, default=8000)
  p.add_argument('--max-logprobs', type=int, default=20,
                 help="largest k of logprobs / prompt_logprobs (-1: the vocabulary; vLLM's default is 20)")
  p.add_argument('--max-batch-size', type=int, default=64, help='rows per forward pass')
  p.add_argument('--batch-wait-ms', type=float, default=0.0,
                 help='scoring requests arriving within this many ms share a forward pass '
                      '(0: each request alone; on CPU batching measured slower, see BUILD.md)')
  p.add_argument('--max-requests', type=int, default=0,
                 help='stop after this many completions (0: serve until killed)')
  p.add_argument('--verbose', action='store_true', help='log every request')
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  engine = Engine(args.model, tokenizer=args.tokenizer, max_batch_size=args.max_batch_size,
                  batch_wait_ms=args.batch_wait_ms)
  server = TeacherServer(engine, host=args.host, port=args.port,
                         served_name=args.served_model_name or args.model, root=args.model,
                         max_logprobs=args.max_logprobs, max_requests=args.max_requests,
                         quiet=not args.verbose)
  print(f'serving {args.model} (fingerprint {engine.fingerprint}, tokenizer '
        f'{engine.tokenizer_fingerprint}) at {server.url}', flush=True)
  with server:
    server.serve_forever()
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
