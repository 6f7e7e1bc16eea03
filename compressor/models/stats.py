"""Size accounting that understands shared weights."""

from __future__ import annotations


def unique_parameters(model) -> tuple[int, int]:
    """``(parameters, bytes)`` of a model, counting a tensor shared by several modules once.

    ``model.num_parameters()`` and ``sum(p.numel())`` count by module path and so count a
    shared weight once per layer that uses it; this counts storage.
    """
    seen: set[tuple[int, int]] = set()
    params = nbytes = 0
    for tensor in (p for _, p in model.named_parameters(remove_duplicate=False)):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        params += tensor.numel()
        nbytes += tensor.numel() * tensor.element_size()
    return params, nbytes
