"""KV cache layers for the decode engine: a decode step writes its column in place.

Installed only. :class:`SpareLayer` overrides public :class:`transformers.cache_utils.DynamicLayer` methods whose
parameters are checked by :func:`cache_api_reason`; the engine is not used (the model falls back to ``model.generate``
with one warning) when they changed.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SpareLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values are views into buffers with ``spare`` free columns after them:
    a decode step writes its new column in place, where :class:`DynamicLayer` copies the whole layer
    (``torch.cat``) at every step. When the room runs out the buffers grow by ``spare`` columns again. The cached
    values are the same as :class:`DynamicLayer`'s (attention over the strided views matched it bit for bit in the
    tests; other kernels may differ in the last bits).

    Args:
        keys, values: ``(batch, heads, length, head_dim)`` the layer's cached keys/values so far (copied); with
            ``length``, buffers whose first ``length`` columns hold them (used as they are, no copy).
        spare: free columns kept after them when the buffers grow (> 0).
        length: see ``keys``.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int, length: int | None = None) -> None:
        super().__init__()
        if not isinstance(spare, int) or spare < 1:
            raise ValueError(f"spare={spare!r} must be an int >= 1.")
        self.spare = spare
        self.lazy_initialization(keys, values)
        if length is None:
            self._grow(keys, values, keys[:, :, :0], values[:, :, :0])
        else:
            self._key_buffer, self._value_buffer = keys, values
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def _grow(self, keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor):
        length = keys.shape[2] + new_keys.shape[2]
        batch, heads, _, dim = new_keys.shape
        self._key_buffer = new_keys.new_empty(batch, heads, length + self.spare, dim)
        self._value_buffer = new_values.new_empty(batch, heads, length + self.spare, values.shape[-1])
        old = keys.shape[2]
        self._key_buffer[:, :, :old], self._key_buffer[:, :, old:length] = keys, new_keys
        self._value_buffer[:, :, :old], self._value_buffer[:, :, old:length] = values, new_values
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is None:  # reset: start again from empty buffers
            self.lazy_initialization(key_states, value_states)
            self._grow(key_states[:, :, :0], value_states[:, :, :0], key_states, value_states)
            return self.keys, self.values
        start, new = self.keys.shape[2], key_states.shape[2]
        if (
            start + new > self._key_buffer.shape[2]
            or key_states.shape[0] != self._key_buffer.shape[0]
            # keys/values replaced by an inherited method (reorder_cache, offload, ...): no longer views of the buffers
            or self.keys.data_ptr() != self._key_buffer.data_ptr()
            or self.values.data_ptr() != self._value_buffer.data_ptr()
        ):
            self._grow(self.keys, self.values, key_states, value_states)
        else:
            self._key_buffer[:, :, start : start + new] = key_states
            self._value_buffer[:, :, start : start + new] = value_states
            self.keys = self._key_buffer[:, :, : start + new]
            self.values = self._value_buffer[:, :, : start + new]
        return self.keys, self.values

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep batch rows ``keep`` (ascending indices) only, in place: each kept row moves up to its new index within
        the buffers, so only rows that had a dropped row before them are copied (``batch_select_indices`` copies
        every kept row)."""
        views = self.keys.data_ptr() == self._key_buffer.data_ptr()
        if not views or self.values.data_ptr() != self._value_buffer.data_ptr():
            self.batch_select_indices(keep)  # keys/values no longer views of the buffers (see update)
            return
        length, target = self.keys.shape[2], torch.arange(len(keep), device=keep.device)
        moved = keep != target
        if bool(moved.any()):  # ascending: a row moves to an index no later row is read from
            source, destination = keep[moved], target[moved]
            for buffer in (self._key_buffer, self._value_buffer):
                buffer[destination, :, :length] = buffer[source, :, :length]
        self._key_buffer, self._value_buffer = self._key_buffer[: len(keep)], self._value_buffer[: len(keep)]
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        length = self.keys.shape[2]
        self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]


# The DynamicLayer methods SpareLayer overrides, with the parameters they had when it was written (transformers 5.24).
CACHE_LAYER_API = {
    "update": ["self", "key_states", "value_states", "args", "kwargs"],
    "batch_select_indices": ["self", "indices"],
    "lazy_initialization": ["self", "key_states", "value_states"],
}


@functools.cache
def cache_api_reason() -> str | None:
    """Why :class:`SpareLayer` cannot be used with the installed transformers (a :class:`DynamicLayer` method it
    overrides is gone or has other parameters than in transformers 5.24, tested), or None if it can."""
    for name, params in CACHE_LAYER_API.items():
        method = getattr(DynamicLayer, name, None)
        found = None if method is None else list(inspect.signature(method).parameters)
        if found != params:
            return f"transformers.cache_utils.DynamicLayer.{name} has parameters {found}, not {params} (tested: 5.24)"
    return None


def spare_cache(kv: Any, spare: int) -> Cache:
    """A :class:`~transformers.Cache` of :class:`SpareLayer` layers holding the ``(keys, values)`` pairs ``kv``."""
    return Cache(layers=[SpareLayer(keys, values, spare) for keys, values in kv])
