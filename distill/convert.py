"""Converts models between Hugging Face folders, distill run exports and GGUF files.

  python -m distill.convert hf-to-distill --src=HF_FOLDER --out=WORKDIR [--dtype=bfloat16]
  python -m distill.convert distill-to-hf --src=WORKDIR --out=HF_FOLDER --tokenizer=HF_FOLDER \
      [--architecture=Qwen3ForCausalLM]
  python -m distill.convert to-gguf --src=WORKDIR_OR_HF_FOLDER --out=model.gguf \
      [--type=q4_k_m] [--tokenizer=HF_FOLDER|char] [--arch=llama]

A distill run export is `WORKDIR/model.json` + `WORKDIR/params/` (distill.train.teacher); that is
what a finished run leaves and what `teacher.checkpoint` reads, so an HF teacher converted with
hf-to-distill can be used as a teacher directly. Weights are sharded over all local devices.
to-gguf takes the tokenizer from --tokenizer ('char': the embedded tasks' CharTokenizer), else
from the source: an HF folder's tokenizer.json, or the tokenizer a run's config.json names.
distill-to-hf and to-gguf carry the student's lineage (distill.provenance): built from a run's
workdir (teacher and data fingerprinted), or the record an HF folder's model card holds; the HF
folder gets it as its model card (README.md), the GGUF file as metadata.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from flax import nnx

from distill import provenance
from distill.data.tokenizer import CharTokenizer
from distill.models import gguf_export, hf
from distill.parallel import mesh as mesh_lib
from distill.train import teacher


def _mesh():
  return mesh_lib.make_mesh({'fsdp': -1})


def _load_any(src: str, dtype: str):
  """A Transformer from a distill run export or a HF folder."""
  if teacher.has_export(src):
    graphdef, params, _ = teacher.load_exported(src, _mesh())
    return nnx.merge(graphdef, params)
  if os.path.isfile(os.path.join(src, 'config.json')):
    return hf.load_hf(src, dtype=dtype, mesh=_mesh())
  raise FileNotFoundError(f'{src!r} is neither a distill run export ({teacher.MODEL_FILE} + '
                          f'{teacher.PARAMS_DIR}/) nor a Hugging Face folder (config.json)')


def hf_to_distill(args):
  _, params, model_config = hf.load_hf_params(args.src, _mesh(), args.dtype)
  teacher.export_final(args.out, model_config, params)
  print(f'wrote {args.out}/{teacher.MODEL_FILE} and {args.out}/{teacher.PARAMS_DIR}/')


def distill_to_hf(args):
  if not teacher.has_export(args.src):
    raise FileNotFoundError(f'{args.src!r} holds no distill run export '
                            f'({teacher.MODEL_FILE} + {teacher.PARAMS_DIR}/)')
  model = _load_any(args.src, args.dtype)
  record = provenance.read(args.src)
  card = None if record is None else provenance.model_card(
      record, os.path.basename(os.path.normpath(args.out)))
  hf.save_hf(model, args.out, tokenizer=args.tokenizer, architecture=args.architecture,
             model_card=card)
  print(f'wrote {args.out}' + ('' if record is None else f' ({record["summary"]})'))


def _source_tokenizer(src: str):
  """The tokenizer that goes with `src`: an HF folder's own, or the one a run was trained with
  (its config.json's `tokenizer`: '' for the CharTokenizer, else an HF folder); None if unknown."""
  if os.path.isfile(os.path.join(src, 'tokenizer.json')):
    return src
  run_config = os.path.join(src, 'config.json')
  if teacher.has_export(src) and os.path.isfile(run_config):
    with open(run_config) as f:
      name = json.load(f).get('tokenizer')
    if name is not None:
      return name or CharTokenizer()
  return None


def to_gguf(args):
  file_type = gguf_export.file_type_key(args.type)   # a typo fails before the model loads
  model = _load_any(args.src, args.dtype)
  tokenizer = (CharTokenizer() if args.tokenizer == 'char' else
               args.tokenizer or _source_tokenizer(args.src))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', gguf_export.TypeFallbackWarning)
    written = gguf_export.export_gguf(model, args.out, tokenizer=tokenizer, file_type=file_type,
                                      arch=args.arch, tokenizer_pre=args.tokenizer_pre,
                                      provenance=provenance.read(args.src))
  for warning in caught:
    if issubclass(warning.category, gguf_export.TypeFallbackWarning):
      print(f'warning: {warning.message}', file=sys.stderr)
    else:
      warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
  counts = {t: list(written.values()).count(t) for t in sorted(set(written.values()))}
  print(f'wrote {args.out}: {len(written)} tensors {counts}'
        + ('' if tokenizer else ' (no tokenizer: llama.cpp cannot tokenize text for it)'))


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m distill.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True)
  for name, fn, help_ in (('hf-to-distill', hf_to_distill, 'HF folder -> distill run export'),
                          ('distill-to-hf', distill_to_hf, 'distill run export -> HF folder'),
                          ('to-gguf', to_gguf, 'distill run export or HF folder -> GGUF')):
    c = sub.add_parser(name, help=help_)
    c.set_defaults(fn=fn)
    c.add_argument('--src', required=True)
    c.add_argument('--out', required=True)
    c.add_argument('--dtype', default='float32', choices=hf.LOAD_DTYPES,
                   help='dtype to load HF weights in')
    if name == 'distill-to-hf':
      c.add_argument('--tokenizer', default=None, help='HF tokenizer folder to include')
    if name == 'distill-to-hf':
      c.add_argument('--architecture', default=None, choices=hf.ARCHITECTURES)
    if name == 'to-gguf':
      c.add_argument('--tokenizer', default=None,
                     help="HF tokenizer folder to include, or 'char' for the CharTokenizer "
                          "(default: the source's, see above)")
      c.add_argument('--type', default='f16',
                     help=f'one of {", ".join(gguf_export.FILE_TYPES)}, any case')
      c.add_argument('--arch', default=None, choices=list(gguf_export.ARCHS),
                     help='llama.cpp architecture (default: from the model, see gguf_export)')
      c.add_argument('--tokenizer-pre', default=None,
                     help="llama.cpp pre-tokenizer name (default: recognised or 'default')")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    args.fn(args)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
