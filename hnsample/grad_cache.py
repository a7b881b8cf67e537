"""GradCache (Gao et al., 2021): a contrastive loss over a large batch with the encoder's activation
memory of one mini-batch. :func:`grad_cache` takes the encoder call(s), the batch columns and any loss
over the embeddings:

1. every mini-batch of every column is embedded without autograd (the RNG state before each call is
   kept: CPU and every initialized CUDA device);
2. the loss runs on the (detached) embeddings with autograd, so only the embeddings' graph is kept;
3. when the returned loss is back-propagated, the gradient that reaches each column's embeddings
   (already multiplied by whatever was applied downstream: a loss scale, a ``1 / accumulation_steps``)
   is cached; each mini-batch is embedded again with autograd, under its kept RNG state and the
   autocast state of step 1, and ``sum(embedding * cached_gradient)`` is back-propagated into the
   encoder.

The loss and every parameter gradient are those of embedding the same mini-batches with autograd and
computing the loss on their concatenation (dropout included: each re-embedding draws the masks of its
first pass). The encoder runs twice per mini-batch (about 1.3x the compute of the uncached step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

Encoder = Callable[[Any], torch.Tensor]

_AUTOCAST_DEVICES = ("cpu", "cuda")


def mini_batches(inputs: Any, size: int) -> list[Any]:
    """Splits a batch column into mini-batches of ``size`` rows (the last may be shorter): a tensor along
    dim 0, a list or tuple by slicing, a mapping of tensors (a tokenizer's features) tensor by tensor with
    other values repeated. For a mapping with a 2-D ``attention_mask``, the trailing token columns that
    are padding in every row of a mini-batch are cut from each tensor of that width (right padding
    contributes nothing to an attention-masked encoder, so a mini-batch of short texts runs at its own
    width)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"mini_batch_size must be an int >= 1, got {size!r}")
    rows = _rows(inputs)
    out = []
    for start in range(0, max(rows, 1), size):
        stop = min(start + size, rows)
        if isinstance(inputs, torch.Tensor):
            out.append(inputs[start:stop])
        elif isinstance(inputs, Mapping):
            out.append(_feature_rows(inputs, start, stop))
        else:
            out.append(inputs[start:stop])
    return out


def _feature_rows(features: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
    mask = features.get("attention_mask")
    width = cut = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and stop > start:
        width = mask.shape[1]
        used = mask[start:stop].bool().any(dim=0).nonzero()
        cut = int(used.max()) + 1 if used.numel() else width
    out = {}
    for k, v in features.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            out[k] = v
        elif cut is not None and cut < width and v.dim() >= 2 and v.shape[1] == width:
            out[k] = v[start:stop, :cut]
        else:
            out[k] = v[start:stop]
    return out


def _rows(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise ValueError("a batch column must have a row dimension, got a 0-d tensor")
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if len(sizes) != 1:
            raise ValueError(f"the tensors of a features mapping must share their row count, got {sorted(sizes)}")
        return sizes.pop()
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    raise TypeError(f"a batch column must be a tensor, a mapping of tensors, a list or a tuple, "
                    f"got {type(inputs).__name__}")


class _RngState:
    """The CPU generator and every initialized CUDA device's generator, to replay a call's random draws."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


class _AutocastState:
    """The autocast setting of step 1, re-entered in step 3 (which runs inside ``backward``, outside the
    caller's ``with torch.autocast(...)`` block)."""

    def __init__(self):
        self.states = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES]

    def contexts(self) -> list[Any]:
        return [torch.autocast(d, dtype=dtype, enabled=on) for d, on, dtype in self.states]


class _Column:
    """One batch column: its encoder, mini-batches and their RNG states, and the embeddings' leaf."""

    def __init__(self, encoder: Encoder, batches: list[Any], keep_rng: bool):
        self.encoder, self.batches = encoder, batches
        self.rng: list[_RngState | None] = []
        chunks = []
        with torch.no_grad():
            for mb in batches:
                self.rng.append(_RngState() if keep_rng else None)
                chunks.append(_embedding(encoder, mb))
        self.sizes = [c.shape[0] for c in chunks]
        self.embeddings = (torch.cat(chunks) if len(chunks) > 1 else chunks[0]).detach()


class _SecondPass:
    """Step 3: back-propagates the loss into the cached embeddings (and the loss's own parameters), drops
    the embeddings and the loss's graph, then re-embeds every mini-batch with autograd and
    back-propagates its slice of the cached gradient. Under DistributedDataParallel all but the last
    mini-batch run under ``no_sync()``, so the parameter gradients are reduced across ranks once."""

    def __init__(self, columns: list[_Column], loss: torch.Tensor, autocast: _AutocastState,
                 ddp: DistributedDataParallel | None):
        self.columns: list[_Column] | None = columns
        self.loss: torch.Tensor | None = loss
        self.autocast, self.ddp = autocast, ddp

    def run(self, grad_output: torch.Tensor) -> None:
        if self.loss is None or self.columns is None:
            raise RuntimeError("the loss of grad_cache can be back-propagated once (its embeddings and graph "
                               "are freed by the first backward)")
        loss, columns = self.loss, self.columns
        self.loss = self.columns = None
        # The loss's gradient lands in the embeddings' .grad (and in the loss's own parameters). Its graph
        # and the embeddings are then dropped: while the encoder runs again only the gradients stay.
        torch.autograd.backward(loss, grad_output)
        del loss
        work = []
        for col in columns:
            grad, col.embeddings.grad = col.embeddings.grad, None
            col.embeddings = None
            if grad is not None:
                work.append((col, grad))
        del columns
        remaining = sum(len(col.batches) for col, _ in work)
        while work:
            col, grad = work.pop(0)
            start = 0
            for mb, rng, rows in zip(col.batches, col.rng, col.sizes, strict=True):
                remaining -= 1
                sync = self.ddp is None or remaining == 0
                with contextlib.ExitStack() as stack:
                    if not sync:
                        stack.enter_context(self.ddp.no_sync())
                    stack.enter_context(rng.replay())
                    for c in self.autocast.contexts():
                        stack.enter_context(c)
                    stack.enter_context(torch.enable_grad())
                    emb = _embedding(col.encoder, mb)
                    if emb.shape[0] != rows:
                        raise RuntimeError(f"the encoder returned {emb.shape[0]} rows on the second pass and "
                                           f"{rows} on the first")
                    g = grad[start:start + rows]
                    start += rows
                    if emb.requires_grad:
                        torch.autograd.backward(emb, g.to(emb.dtype))
                    del emb, g
            del grad, col


class _CachedLoss(torch.autograd.Function):
    """The loss's value; its backward is the second pass (``anchor``: a fresh leaf, so that the result
    requires grad; it gets no gradient)."""

    @staticmethod
    def forward(ctx, second: _SecondPass, anchor: torch.Tensor) -> torch.Tensor:
        ctx.second = second
        return second.loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        ctx.second.run(grad_output)
        return None, None


def _embedding(encoder: Encoder, mini_batch: Any) -> torch.Tensor:
    if isinstance(mini_batch, Mapping):
        # A shallow copy per call: sentence-transformers' modules add their outputs (token embeddings)
        # to the features dict in place, which would otherwise keep every mini-batch's activations
        # alive until the second pass.
        mini_batch = dict(mini_batch)
    emb = encoder(mini_batch)
    if not isinstance(emb, torch.Tensor):
        raise TypeError(f"the encoder must return a tensor of embeddings, got {type(emb).__name__}")
    if emb.dim() == 0:
        raise ValueError("the encoder must return one embedding per row, got a 0-d tensor")
    return emb


def grad_cache(
    loss_fn: Callable[..., torch.Tensor],
    encoders: Encoder | Sequence[Encoder],
    columns: Iterable[Any],
    *,
    mini_batch_size: int,
    split: Callable[[Any, int], list[Any]] = mini_batches,
    distributed_model: torch.nn.Module | None = None,
) -> torch.Tensor:
    r"""``loss_fn(*embeddings)`` for the batch ``columns`` with the activation memory of one mini-batch.

    ``columns``: the inputs of each batch column (e.g. anchors, positives, hard negatives), each a
    tensor, a mapping of tensors (a tokenizer's features) or a list; ``split(column, mini_batch_size)``
    cuts each into mini-batches (:func:`mini_batches` by default). ``encoders``: one callable
    ``mini_batch -> (rows, ...) tensor`` for every column, or a single one for all of them (normalize
    inside it if the loss wants unit vectors). ``loss_fn`` gets one tensor per column, the rows of its
    mini-batches concatenated, and returns the loss (any shape; it is what is returned).

    The result is the loss's value; its backward (``loss.backward()``, ``scaler.scale(loss).backward()``,
    or a ``loss / steps`` for gradient accumulation) back-propagates the loss into the embeddings and the
    loss's own parameters (a learnable temperature), frees the embeddings and the loss's graph, then
    re-embeds each mini-batch with autograd and leaves in every ``.grad`` what the uncached step (the
    same mini-batch calls with autograd, the loss on their concatenation) would leave, dropout and other
    random draws included: each mini-batch's RNG state (CPU and initialized CUDA devices) of the first
    pass is restored for the second. The autocast state at the call is re-entered for the second pass.
    While the encoder runs again, the cached state is the embeddings' gradients only (as in
    sentence-transformers' Cached* losses). Parameters receive their gradient through ``backward``
    (``torch.autograd.grad`` would not reach them: the second pass accumulates into ``.grad``), and the
    result can be back-propagated once. Under ``torch.no_grad()`` the loss is computed in mini-batches
    and nothing is kept.

    ``distributed_model``: the ``DistributedDataParallel`` module the encoders call, if any; the second
    pass then reduces the gradients across ranks once, after the last mini-batch, instead of once per
    mini-batch. (Without it the result is the same, with one reduction per mini-batch.)

    The encoders must be deterministic given the RNG state and must not change between the call and
    ``backward`` (no optimizer step in between).
    """
    cols = list(columns)
    if not cols:
        raise ValueError("columns must hold at least one batch column")
    if callable(encoders):
        encs = [encoders] * len(cols)
    else:
        encs = list(encoders)
        if len(encs) != len(cols) or not all(callable(e) for e in encs):
            raise TypeError(f"encoders must be a callable or one callable per column ({len(cols)})")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    ddp = distributed_model if isinstance(distributed_model, DistributedDataParallel) else None
    if distributed_model is not None and ddp is None:
        raise TypeError(f"distributed_model must be a DistributedDataParallel module, got "
                        f"{type(distributed_model).__name__}")
    grad = torch.is_grad_enabled()
    autocast = _AutocastState()
    state = [_Column(e, split(c, mini_batch_size), keep_rng=grad) for e, c in zip(encs, cols, strict=True)]
    if not grad:
        loss = loss_fn(*(c.embeddings for c in state))
        _check_loss(loss)
        return loss
    loss = loss_fn(*(c.embeddings.requires_grad_(True) for c in state))
    _check_loss(loss)
    if not loss.requires_grad:
        return loss
    anchor = torch.zeros((), requires_grad=True)
    return _CachedLoss.apply(_SecondPass(state, loss, autocast, ddp), anchor)


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
