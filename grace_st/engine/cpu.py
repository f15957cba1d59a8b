"""CPU kernels of the decode engine: the greedy next token from a screened bfloat16 product of the output head
(:class:`GreedyHead`, on by default), weights laid out for few-row products and MKL-packed weights for full batches
(both off by default).

Installed only. All are no-ops off the CPU (the head also without bfloat16 instructions, the packed products without
MKL or with other op schemas).
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


# Greedy decoding on a CPU with bfloat16 instructions reads the next token from a bfloat16 product of the output
# head, screened by a bound on its error (:class:`GreedyHead`): on the 2-core CPU of the README the head's float32
# product is ~17 ms of a ~103 ms 16-row decode step, its bfloat16 product ~5 ms.
SCREENED_HEAD = True
# Candidates above which a step computes the whole float32 head instead (a loose bound; never seen on SmolLM2).
SCREEN_LIMIT = 4096


def bf16_products_reason(device: torch.device) -> str | None:
    """Why bfloat16 products are not fast on ``device`` (then :class:`GreedyHead` is not used), or None."""
    if device.type != "cpu":
        return f"the model is on {device.type}, not the CPU"
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private: absent in another torch, then off
    if probe is None or not callable(probe):
        return "this torch cannot tell whether the CPU multiplies bfloat16 natively"
    try:
        native = bool(probe())
    except Exception as error:  # a changed private probe: the float32 head, as without bfloat16 instructions
        return f"torch.cpu._is_avx512_bf16_supported failed: {error!r}"
    return None if native else "the CPU has no bfloat16 instructions (AVX512-BF16)"


class GreedyHead:
    """The greedy next token of each row, ``argmax(states @ weight.T)``, from a bfloat16 product screened by a
    rigorous bound on its error, then float32 products for the few candidate tokens only.

    For row ``h`` and token ``j`` (``w_j``: the weight's row, ``n``: the hidden size, ``u = 2**-8``: bfloat16's unit
    roundoff, ``g = n * 2**-24 / (1 - n * 2**-24)``: a float32 sum of ``n`` products), the bfloat16 logit ``b_j``
    (inputs rounded to bfloat16, products summed in float32, the sum rounded to bfloat16) and the float32 logit
    ``f_j`` differ by at most ``e_j = (2u + u^2 + g (1 + u)^2 + g) * |h| * |w_j| + u / (1 - u) * |b_j|``
    (Cauchy-Schwarz bounds ``sum_i |h_i| |w_ji|``; this assumes what torch's CPU bfloat16 product does: products
    summed in float32, the sum rounded once, no underflow; measured on this CPU, its error reached 0.96 of the bound's
    rounding terms). With ``k`` the bfloat16 argmax, the float32 argmax is among the tokens with
    ``b_j + e_j >= b_k - e_k``; their float32 logits decide (ties: the lowest id, as ``argmax``). So the
    token is the float32 head's up to the last bits of its product (candidates' logits come from a smaller product,
    like another batch shape). Costs a bfloat16 copy of the weight (half its size) while the object lives.

    Args:
        weight: ``(vocab, hidden)`` float32 weight of a bias-free output head (not copied; do not change it while the
            object is used).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.low = weight.to(torch.bfloat16)
        self.norms = weight.norm(dim=1)
        self.norm_max = float(self.norms.max())
        n, u = weight.shape[1], 2.0**-8
        g = n * 2.0**-24 / (1 - n * 2.0**-24)
        self.relative = 2 * u + u * u + g * (1 + u) ** 2 + g  # times |h| |w_j|
        self.rounding = u / (1 - u)  # times |b_j|

    def bound(self, state_norms: torch.Tensor, low: torch.Tensor, column: torch.Tensor | None = None) -> torch.Tensor:
        """``e_j``, the bound on ``|b_j - f_j|``, for bfloat16 logits ``low``: ``(rows, vocab)`` with ``state_norms``
        ``(rows, 1)`` the states' L2 norms; or, with ``column``, one logit per entry, of token ``column[i]`` for a
        state of norm ``state_norms[i]``."""
        norms = self.norms if column is None else self.norms[column]
        return self.relative * state_norms * norms + self.rounding * low.float().abs()

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        """``(rows,)`` greedy token ids for ``(rows, hidden)`` float32 last-layer states. Rows that are not finite
        (or a loose bound: over :data:`SCREEN_LIMIT` candidates) take the float32 product of the whole head."""
        if len(states) == 0:
            return torch.zeros(0, dtype=torch.long, device=states.device)
        if not bool(torch.isfinite(states).all()):  # NaN compares false: no candidate would be left
            return torch.nn.functional.linear(states, self.weight).argmax(dim=1)
        low = torch.nn.functional.linear(states.to(torch.bfloat16), self.low)
        top = low.argmax(dim=1)
        size = states.norm(dim=1)
        top_value = low[torch.arange(len(states), device=states.device), top]
        floor = top_value.float() - self.bound(size, top_value, top)
        # Candidates: b_j + e_j >= floor; first with the largest e_j of the row, then with each token's own.
        widest = self.relative * size * self.norm_max + self.rounding * low.abs().amax(dim=1).float()
        row, column = (low >= (floor - widest).unsqueeze(1)).nonzero(as_tuple=True)
        value = low[row, column]
        keep = value.float() + self.bound(size[row], value, column) >= floor[row]
        row, column = row[keep], column[keep]
        if len(column) > SCREEN_LIMIT:
            return torch.nn.functional.linear(states, self.weight).argmax(dim=1)
        tokens, slot = torch.unique(column, sorted=True, return_inverse=True)
        exact = torch.full((len(states), len(tokens)), float("-inf"), dtype=states.dtype, device=states.device)
        exact[row, slot] = torch.nn.functional.linear(states, self.weight[tokens])[row, slot]
        return tokens[exact.argmax(dim=1)]


def greedy_head(model: Any, do_sample: bool) -> GreedyHead | None:
    """A :class:`GreedyHead` for ``model``'s output head when :data:`SCREENED_HEAD` is on, decoding is greedy, the
    head is a bias-free float32 ``torch.nn.Linear`` and :func:`bf16_products_reason` is None; else None. The caller
    still checks that the model's logits are this head's product of the last-layer states (see
    :func:`head_matches`)."""
    if not SCREENED_HEAD or do_sample or bf16_products_reason(model.device) is not None:
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight.detach()
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu":
        return None
    return GreedyHead(weight)


def head_matches(head: GreedyHead, states: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether ``logits`` (``(rows, vocab)``, the model's own) are ``head``'s float32 product of ``states``
    (``(rows, hidden)``) within float tolerance (1e-5 of the largest logit): a model that caps, shifts or biases its
    logits fails."""
    if logits.shape != (len(states), head.weight.shape[0]):
        return False
    mine = torch.nn.functional.linear(states, head.weight)
    return bool(torch.allclose(mine, logits.float(), rtol=0.0, atol=1e-5 * float(logits.abs().max()) + 1e-6))
