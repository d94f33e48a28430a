"""`python -m bcdnet_jax COMMAND [ARGS]`: the command-line tools in one place.

    convert   a released PyTorch checkpoint -> model directory  (bcdnet-convert)
    export    model directory -> deploy artefact                 (bcdnet-export)
    predict   top-k classes of images with a deploy artefact     (bcdnet-predict)
    prepare   TFDS data sets in ArrayRecord format                (bcdnet-prepare)
    report    plots and a page of a training workdir             (bcdnet-report)
    summary   parameters, BOPs, FLOPs, OPs and sizes of a model  (bcdnet-summary)

Training and evaluation run through `main.py --config=configs/...`.
"""

import importlib
import sys

COMMANDS = {
    "convert": "bcdnet_jax.interop.convert",
    "export": "bcdnet_jax.deploy.export",
    "predict": "bcdnet_jax.deploy.predict",
    "prepare": "bcdnet_jax.data.prepare",
    "report": "bcdnet_jax.train.report",
    "summary": "bcdnet_jax.summary",
}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__.strip())
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"error: unknown command {name!r}; one of: {', '.join(COMMANDS)} "
          "(python -m bcdnet_jax --help)", file=sys.stderr)
    return 2
  module = importlib.import_module(COMMANDS[name])
  sys.argv = [f"python -m bcdnet_jax {name}", *rest]  # argparse's usage line names the command
  return module.main(rest)


if __name__ == "__main__":
  from bcdnet_jax import errors
  errors.run_cli(main)
