"""Averagers inside other people's training loops.

- :mod:`belay_kernels.integrations.lightning`: ``WeightAveraging``, a Lightning callback
  (``pytorch_lightning`` or ``lightning.pytorch``).
- :mod:`belay_kernels.integrations.transformers`: ``AveragingCallback`` for
  ``transformers.Trainer``.

Each module imports its library only when it is imported itself, so ``belay_kernels``
does not depend on either (``pip install belay_kernels[lightning]`` / ``[transformers]``).
"""
