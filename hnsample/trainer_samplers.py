"""hnsample's batch samplers under the Hugging Face / sentence-transformers Trainer.

Each hnsample sampler shards by rank itself (rank r keeps global batches r, r + W, ...). The Trainer
hands its batch sampler to accelerate, which shards the batches by rank once more, so a rank would see
a quarter of the batches on 2 processes (2 steps per epoch instead of 4). :class:`TrainerBatchSampler`
yields the sampler's global list instead (every rank's batches, already cut to a multiple of the world
size) and leaves the split to accelerate, whose rank r takes batches r, r + W, ...: the same batches
each rank would get from the sampler on its own, every item once per epoch across the ranks.

    args = SentenceTransformerTrainingArguments(
        ..., batch_sampler=hnsample.trainer_batch_sampler(
            lambda dataset, batch_size, drop_last, seed: hnsample.NoDuplicatesBatchSampler(
                list(zip(dataset["anchor"], dataset["positive"])), batch_size, drop_last=drop_last, seed=seed)))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import Sampler


class TrainerBatchSampler(Sampler[list[int]]):
    """Wraps an hnsample batch sampler for a loader that accelerate shards: yields all ranks' batches of
    the epoch (``sampler.global_batches()``) in the order whose every ``world_size``-th entry from ``rank``
    is that rank's; ``set_epoch`` is forwarded."""

    def __init__(self, sampler: Any):
        if not hasattr(sampler, "global_batches") or not hasattr(sampler, "set_epoch"):
            raise TypeError(f"sampler must be an hnsample batch sampler, got {type(sampler).__name__}")
        self.sampler = sampler

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def drop_last(self) -> bool:
        return self.sampler.drop_last

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self.sampler.global_batches())

    def __len__(self) -> int:
        return len(self.sampler.global_batches())


def trainer_batch_sampler(make: Callable[..., Any]) -> Callable[..., TrainerBatchSampler]:
    """A ``batch_sampler`` for ``SentenceTransformerTrainingArguments``: the Trainer calls it with
    ``(dataset, batch_size, drop_last, valid_label_columns, generator, seed)``; it calls
    ``make(dataset, batch_size=..., drop_last=..., seed=...)`` (which builds an hnsample sampler; its rank
    and world size default to torch.distributed's) and wraps the result in :class:`TrainerBatchSampler`."""
    if not callable(make):
        raise TypeError(f"make must be callable, got {type(make).__name__}")

    def build(dataset: Any, batch_size: int, drop_last: bool, valid_label_columns: Any = None,
              generator: Any = None, seed: int = 0) -> TrainerBatchSampler:
        return TrainerBatchSampler(make(dataset, batch_size=batch_size, drop_last=drop_last, seed=seed))

    return build
