"""``belay-kernels bench``: memory bandwidth and step time of every method, on every
available backend, against the peer libraries, over a size sweep and on real models.

Modules, one concern each: :mod:`.traffic` (the bytes each method must move),
:mod:`.timing`, :mod:`.flat_cases` (our ops per backend), :mod:`.peers` (the other
libraries through their own APIs), :mod:`.sweep`, :mod:`.model_level` with
:mod:`.architectures` and :mod:`.opcount`, :mod:`.report`, :mod:`.plot`,
:mod:`.machine`, :mod:`.overhead` (the host time of one ``step()`` on tiny tensors) and
:mod:`.command` (the command line).
"""

from .command import main

__all__ = ["main"]
