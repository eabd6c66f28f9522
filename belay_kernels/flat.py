"""Flat parameter buffers: a model's tensors, grouped by (device, dtype), moved into one
contiguous buffer per group, each tensor's ``.data`` becoming a view into its buffer.

After flattening, one kernel launch covers a whole group. The Parameter objects stay the
same objects, so an optimizer built before or after keeps working, and
``model.state_dict()`` has the same keys, shapes and values.

A tensor stays out of the buffers, on the tensor-list path, when moving it could change
behaviour: it is not contiguous, it is a tensor subclass (a DTensor shard, say), or its
storage holds more than this tensor (a view, or memory shared with something else), or
another of the tensors uses the same storage (two Parameters over one tensor).

Every view starts on a 16-byte boundary, as a tensor of its own would: the user's
optimizer (foreach and fused kernels), cuBLASLt and Inductor take slower paths for
misaligned inputs, and flattening must not slow down the rest of the training step. The
padding between views is zero in every buffer laid out like the group's, so it stays
zero under every update (and is never counted as non-finite); no view covers it, so the
model, the state_dict and the averager's reported state never see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._checks import BelayInputError


@dataclass
class Slot:
    """One named tensor inside a flat buffer."""

    name: str
    tensor: torch.Tensor  # the Parameter or buffer whose .data is a view into the group
    offset: int
    numel: int
    shape: torch.Size


@dataclass
class FlatGroup:
    """Tensors of one (device, dtype), living in one contiguous ``buffer``."""

    buffer: torch.Tensor
    slots: list[Slot] = field(default_factory=list)

    @property
    def key(self) -> tuple[torch.device, torch.dtype]:
        return self.buffer.device, self.buffer.dtype

    def view(self, flat: torch.Tensor, slot: Slot) -> torch.Tensor:
        """``slot``'s part of any tensor laid out like this group's buffer."""
        return flat[slot.offset : slot.offset + slot.numel].view(slot.shape)

    def stale_slots(self) -> list[str]:
        """Names of tensors whose .data no longer points into this group's buffer."""
        base = self.buffer.data_ptr()
        size = self.buffer.element_size()
        return [
            s.name
            for s in self.slots
            if s.tensor.data_ptr() != base + s.offset * size or s.tensor.shape != s.shape
        ]


def _owns_its_storage(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def can_flatten(t: torch.Tensor) -> bool:
    data = t.data
    return (
        type(data) is torch.Tensor
        and data.is_contiguous()
        and data.numel() > 0
        and _owns_its_storage(data)
    )


def _storage_of(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.data.untyped_storage().data_ptr()


def _shared_storages(tensors: list[torch.Tensor]) -> set[tuple[torch.device, int]]:
    """The storages that more than one of ``tensors`` uses (two Parameters over one tensor,
    a buffer aliasing a parameter): moving either would break the sharing. A storage at
    address 0 holds no data (the meta device) and is shared by nothing."""
    seen, shared = set(), set()
    for t in tensors:
        key = _storage_of(t)
        if key[1] != 0 and t.numel() > 0 and key in seen:
            shared.add(key)
        seen.add(key)
    return shared


def _forget_stale_group(t: torch.Tensor) -> None:
    """A tensor whose .data was moved out of its group (model.to(...)) is free to join a
    new one: that is how an averager is rebuilt on a moved model."""
    group = getattr(t, "_belay_flat_group", None)
    if group is None:
        return
    start, buffer = t.data_ptr(), group.buffer
    inside = buffer.data_ptr() <= start < buffer.data_ptr() + buffer.nbytes
    if not inside or t.dtype != buffer.dtype:
        del t._belay_flat_group


def _existing_group(tensors: list[torch.Tensor]) -> FlatGroup | None:
    """The group these exact tensors already live in (a second averager on one model)."""
    groups = {id(getattr(t, "_belay_flat_group", None)) for t in tensors}
    group = getattr(tensors[0], "_belay_flat_group", None)
    if len(groups) != 1 or group is None or group.stale_slots():
        return None
    if [id(s.tensor) for s in group.slots] != [id(t) for t in tensors]:
        return None
    return group


def flatten(
    named: list[tuple[str, torch.Tensor]],
) -> tuple[list[FlatGroup], list[tuple[str, torch.Tensor]]]:
    """Move ``named`` tensors into flat buffers, one per (device, dtype).

    Returns the groups and the (name, tensor) pairs left on the tensor-list path.
    """
    by_key: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    leftovers = []
    for _, t in named:
        _forget_stale_group(t)
    shared = _shared_storages([t for _, t in named])
    for name, t in named:
        in_a_group = getattr(t, "_belay_flat_group", None) is not None
        if in_a_group or (can_flatten(t) and _storage_of(t) not in shared):
            by_key.setdefault((t.device, t.dtype), []).append((name, t))
        else:
            leftovers.append((name, t))

    groups = []
    for members in by_key.values():
        tensors = [t for _, t in members]
        group = _existing_group(tensors)
        if group is None:
            if any(getattr(t, "_belay_flat_group", None) is not None for t in tensors):
                # Already in another averager's buffer with different company: leave those
                # where they are and take the list path, rather than moving them twice.
                leftovers.extend(members)
                continue
            group = _build_group(members)
        groups.append(group)
    return groups, leftovers


VIEW_ALIGNMENT = 16  # bytes


def _aligned_offsets(sizes: list[int], element_size: int) -> tuple[list[int], int]:
    """Each view's first element, rounded up to VIEW_ALIGNMENT bytes, and the total."""
    step = max(1, VIEW_ALIGNMENT // element_size)
    offsets, end = [], 0
    for n in sizes:
        start = -(-end // step) * step
        offsets.append(start)
        end = start + n
    return offsets, end


def _build_group(members: list[tuple[str, torch.Tensor]]) -> FlatGroup:
    first = members[0][1]
    offsets, total = _aligned_offsets([t.numel() for _, t in members], first.element_size())
    buffer = torch.zeros(total, dtype=first.dtype, device=first.device)
    group = FlatGroup(buffer)
    with torch.no_grad():
        for (name, t), offset in zip(members, offsets):
            n = t.numel()
            view = buffer[offset : offset + n].view(t.shape)
            view.copy_(t.data)
            t.data = view
            group.slots.append(Slot(name, t, offset, n, t.shape))
            t._belay_flat_group = group
    return group


def stale_names(groups: list[FlatGroup]) -> list[str]:
    """Tensors whose .data no longer lives in their flat buffer, in every group."""
    return [name for group in groups for name in group.stale_slots()]


def check_not_stale(groups: list[FlatGroup], method: str = "EMA") -> None:
    refuse_moved(stale_names(groups), method)


def refuse_moved(
    names: list[str], method: str, where: str = "in the averager's flat buffer"
) -> None:
    """Refuse to go on when the model's tensors ``names`` no longer live ``where`` the
    averager was built on them."""
    if not names:
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise BelayInputError(
        f"the model's tensors {shown} no longer live {where}: "
        "their .data was replaced (model.to(), .cuda(), .half(), "
        "load_state_dict(assign=True), or assigning .data). The averager would "
        "update memory the model no longer uses. To keep the average accumulated so "
        "far: (1) state = averager.state_dict(), which still works and warns that the "
        f"views are stale; (2) averager = belay_kernels.{method}(model, ...) with the "
        "same options, on the moved model; (3) averager.load_state_dict(state), which "
        "copies the shadow to the model's new device and dtype."
    )
