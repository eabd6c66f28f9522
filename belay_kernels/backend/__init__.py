"""The backends, one module per ``backend=`` name: :mod:`.torch`, :mod:`.inductor`,
:mod:`.cpp`, :mod:`.cuda` and the package :mod:`.triton`. The ``cpp`` and ``cuda``
backends share their Python glue (:mod:`._compiled`, the functions on top of the compiled
ops; :mod:`._library`, loading the compiled modules and their fake ops). The
``reference`` backend is the spec itself, :mod:`belay_kernels.reference`.

Nothing here is imported until a backend is first used (:mod:`belay_kernels._backends`
loads them by name); a missing or broken one is reported by ``belay_kernels.backends()``
and the ops fall back to the torch backend.
"""
