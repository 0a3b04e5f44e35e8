"""`python -m distill.evaluate`: a (quantized) student evaluated (distill.eval.quantized)."""
import sys

from distill.eval.quantized import main

if __name__ == '__main__':
  sys.exit(main())
