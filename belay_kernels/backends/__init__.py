"""The backends, one module per ``backend=`` name: :mod:`.torch`, :mod:`.inductor`,
:mod:`.cpp`, :mod:`.cuda` and the package :mod:`.triton`. The ``cpp`` and ``cuda``
backends share their Python glue (:mod:`._compiled`, the functions on top of the compiled
ops; :mod:`._library`, loading the compiled modules and their fake ops). The
``reference`` backend is the spec itself, :mod:`belay_kernels.reference`.

Nothing here is imported until a backend is first used (:mod:`belay_kernels._backends`
loads them by name); a missing or broken one is reported by ``belay_kernels.backends()``
and the ops fall back to the torch backend.

``belay_kernels.backends`` is both this package and the function that reports every
backend's status: the package is callable, so that importing a backend (which makes this
package an attribute of ``belay_kernels``) does not replace the function.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self) -> dict[str, str]:
        """Every backend's status on this machine: 'available (devices)' or why not."""
        from .._backends import backends

        return backends()


sys.modules[__name__].__class__ = _CallablePackage
