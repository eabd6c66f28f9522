"""Whether the model still holds the tensors an averager planned its kernel calls on.

An averager checks its tensors and picks its kernels once (:mod:`belay_kernels.plan`). A
step must still refuse, before it writes anything, when the model has stopped using the
planned memory: ``model.to()`` gives the parameters new ``.data``,
``load_state_dict(assign=True)`` and ``fully_shard`` put other tensor objects into the
module, and FSDP2 may give a DTensor parameter a new local shard.
:meth:`BoundTensors.first_moved` looks for all of these in one call: with the compiled
extension a loop in C++ (``csrc/bound_tensors.cpp``), otherwise the same loop here. What
it finds is explained (or planned around) by the averager's full checks.
"""

from __future__ import annotations

import torch


class BoundTensors:
    """The memory of every averaged tensor and the module entry that holds it.

    ``tables[i]`` is the dict the module keeps tensor ``i`` in (an owner module's
    ``_parameters`` or ``_buffers``; None for tensors given as a list), ``keys[i]`` its key
    there; ``local[i]`` says that ``tensors[i]`` is a DTensor whose local shard holds the
    memory."""

    def __init__(self, tables: list, keys: list, tensors: list[torch.Tensor], local: list[bool]):
        compiled = _compiled_class()
        if compiled is not None:
            checker = compiled(list(tables), list(keys), list(tensors), list(local))
            self.first_moved = checker.first_moved
        else:
            self._entries = [
                (table, key, t, is_local, _memory(t, is_local))
                for table, key, t, is_local in zip(tables, keys, tensors, local)
            ]
            self.first_moved = self._first_moved

    def first_moved(self) -> int:  # replaced per instance in __init__
        """The index of the first tensor that is not held where it was planned, or -1."""
        raise NotImplementedError

    def _first_moved(self) -> int:
        for i, (table, key, t, is_local, memory) in enumerate(self._entries):
            if table is not None and table.get(key) is not t:
                return i
            if _memory(t, is_local) != memory:
                return i
        return -1


def _memory(t: torch.Tensor, is_local: bool) -> tuple | None:
    holder = getattr(t, "_local_tensor", None) if is_local else t
    if not isinstance(holder, torch.Tensor):
        return None
    try:
        address = holder.data_ptr()
    except RuntimeError:  # a tensor without storage
        address = None
    return address, tuple(holder.shape), holder.dtype


_COMPILED: list = []  # [the compiled class, or None], filled on first use


def _compiled_class():
    """The compiled checker; None where the extension is not built (or predates it)."""
    if not _COMPILED:
        from .backend._library import cpu_module

        _COMPILED.append(getattr(cpu_module()[0], "BoundTensors", None))
    return _COMPILED[0]
