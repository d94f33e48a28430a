"""Deployment: a trained model folded into a packed artefact and run without Flax.

    export    fold BatchNorm and the weight scales, pack the sign bits, write the artefact
              (`bcdnet-export`)
    packed    the artefact format and its runtime: XNOR-popcount, int8 or float paths
    header_checks  the ranges of every header value (a signed header is not a sane one)
    predict   top-k classes of image files with an artefact (`bcdnet-predict`)

Import the module you need (`from bcdnet_jax.deploy import packed`): the runtime alone
loads no Orbax, torch, TensorFlow or Grain.
"""
