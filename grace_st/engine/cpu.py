"""CPU kernels of the decode engine: weights laid out for few-row products, and MKL-packed weights for full batches.

Installed only. Both are no-ops off the CPU (and the packed products without MKL or with other op schemas).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)
_LOGGED: set[str] = set()

# Which CPU kernels the decode loop uses: MKL-packed weights for full batches, and the transposed weight layout for
# few-row products. Both off: on the 2-core CPU of the README (64 STS sentences, 48 new tokens, one thread) their
# set-up at every call cost more than they saved (encode_corpus 28.2 s with both, 26.5 s without; model.encode at
# batch 16 31.9 s vs 28.9 s), and their copies of the weights raised encode_corpus's peak RSS from 1.18x to 2.17x
# generate's.
PACKED = False
LAYOUT = False


@contextlib.contextmanager
def cpu_kernels(model: Any, rows: int) -> Iterator[None]:
    """The CPU kernels of :data:`PACKED` and :data:`LAYOUT` while active (a no-op off the CPU)."""
    with contextlib.ExitStack() as stack:
        if PACKED:
            stack.enter_context(packed_linears(model, rows))
        if LAYOUT:
            stack.enter_context(cpu_weight_layout(model))
        yield


_LAYOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def cpu_weight_layout(model: Any) -> Iterator[None]:
    """While active, the float32 weights of the ``torch.nn.Linear`` modules of a model on a CPU are stored
    transposed (``[in, out]`` contiguous; the tensors keep their shape and values): ``x @ W.T`` then runs as a plain
    product, which on MKL costs less at a few rows (a decode step): ``benchmarks/encode_speed.py``. Products may
    differ from the usual layout's in the last bits. The weights are laid out again in place, one at a time (no second
    copy of the model; an update of their values meanwhile is kept), on entry and on exit (two copies of each weight
    per call, ~0.3 s each for 135M parameters). A no-op on other devices and dtypes, and while another call already
    holds the layout. The model must not be run with gradients by another thread meanwhile."""
    if model.device.type != "cpu" or not _LAYOUT_LOCK.acquire(blocking=False):
        yield
        return
    weights: dict[int, torch.nn.Parameter] = {}
    try:
        for module in model.modules():
            weight = getattr(module, "weight", None) if isinstance(module, torch.nn.Linear) else None
            if (
                isinstance(weight, torch.nn.Parameter)
                and id(weight) not in weights
                and weight.dtype == torch.float32
                and weight.device.type == "cpu"
                and weight.dim() == 2
                and weight.is_contiguous()
            ):
                weights[id(weight)] = weight
                weight.data = weight.data.t().contiguous().t()  # the usual layout's storage is freed
        yield
    finally:
        for weight in weights.values():
            weight.data = weight.data.contiguous()
        _LAYOUT_LOCK.release()


# torch's own CPU ops for MKL's packed matrix product (private: torch's compiler uses them), as tested (torch 2.13).
MKL_PACKED_SCHEMAS = {
    "_mkl_reorder_linear_weight": "mkl::_mkl_reorder_linear_weight(Tensor X, int batch_size) -> Tensor",
    "_mkl_linear": "mkl::_mkl_linear(Tensor X, Tensor MKL_W, Tensor ORI_W, Tensor? B, int batch_size) -> Tensor",
}


def packing_unsupported_reason(model: Any) -> str | None:
    """Why :func:`packed_linears` leaves ``model`` as it is, or None if it packs its weights."""
    if model.device.type != "cpu":
        return f"the model is on {model.device.type}, not the CPU"
    if not torch.backends.mkl.is_available():
        return "this torch build has no MKL"
    for name, schema in MKL_PACKED_SCHEMAS.items():
        op = getattr(torch.ops.mkl, name, None)
        found = str(op.default._schema) if op is not None else None
        if found != schema:
            return f"torch.ops.mkl.{name} is {found!r}, not {schema!r} as in torch 2.13 (tested)"
    return None


@contextlib.contextmanager
def packed_linears(model: Any, rows: int) -> Iterator[None]:
    """While active, the float32 ``torch.nn.Linear`` modules of a model on a CPU with MKL multiply inputs of exactly
    ``rows`` rows (a decode step of a full batch) by weights packed once on entry, through torch's own MKL ops
    (:data:`MKL_PACKED_SCHEMAS`): the usual product re-packs every weight at every call (on this CPU a full
    16-row decode step then costs ~9 ms less of ~113: ``benchmarks/encode_speed.py``). Other row counts, and
    modules whose ``forward`` is already replaced (e.g. by accelerate's hooks), use the usual product. The results
    equal ``torch.nn.functional.linear``'s (tests/test_streaming.py); where gradients are needed the usual product
    runs (the packed op has no backward). Where :func:`packing_unsupported_reason` gives a reason, a no-op (logged
    once). Costs one packed copy of the weights while active (on top of :func:`cpu_weight_layout`'s copy when both are
    active: continuous batching). The packed weights are those of the moment of entry: do not change the weights while
    it is active."""
    reason = packing_unsupported_reason(model)
    if reason is not None:
        if model.device.type == "cpu" and reason not in _LOGGED:
            _LOGGED.add(reason)
            logger.warning("Continuous batching multiplies without packed weights (a little slower): %s.", reason)
        yield
        return
    patched = []
    try:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, torch.nn.Linear)
                and "forward" not in vars(module)
                and isinstance(weight, torch.Tensor)
                and weight.dtype == torch.float32
                and weight.dim() == 2
            ):
                packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
                module.forward = functools.partial(_packed_forward, module, packed, rows)
                patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor, rows: int, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` by MKL's packed product when ``x`` has ``rows`` rows (torch's op falls back to the usual product
    with ``module.weight`` otherwise)."""
    flat = x.reshape(-1, x.shape[-1])
    grads = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
    if grads or flat.dtype != torch.float32 or flat.shape[0] != rows:  # the packed op has no backward
        return torch.nn.functional.linear(x, module.weight, module.bias)
    out = torch.ops.mkl._mkl_linear(flat, packed, module.weight, module.bias, rows)
    return out.reshape(*x.shape[:-1], out.shape[-1])
