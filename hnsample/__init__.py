"""hnsample: exact, memory-flat hard-negative mining, filtering and sampling for PyTorch."""

from ._ext import has_cuda
from .distillation import (
    SentenceTransformerDistillKLDivLoss,
    SentenceTransformerMarginMSELoss,
    listwise_kl,
    margin_mse,
)
from .dynamic import DynamicNegativeMiner, DynamicNegatives
from .grad_cache import grad_cache, mini_batches
from .losses import InfoNCELoss, SentenceTransformerInfoNCELoss, own_candidates_info_nce
from .miners import Triplets, batch_hard, semi_hard, triplet_margin_loss
from .mining import MinedNegatives, mine_hard_negatives
from .mixing import MixedNegatives, MoCHi, mix_hard_negatives
from .ops.candidates import topk_from_candidates
from .ops.info_nce import info_nce
from .ops.topk import TopK, topk_from_scores, topk_similarity
from .queue import NegativeQueue, QueueNegatives
from .samplers import ClusterBatchSampler, MPerClassBatchSampler, NeighbourBatchSampler, NoDuplicatesBatchSampler
from .trainer_samplers import TrainerBatchSampler, trainer_batch_sampler

__version__ = "0.1.0"

__all__ = [
    "ClusterBatchSampler", "DynamicNegativeMiner", "DynamicNegatives", "InfoNCELoss", "MPerClassBatchSampler",
    "MinedNegatives", "MixedNegatives", "MoCHi", "NegativeQueue", "NeighbourBatchSampler",
    "NoDuplicatesBatchSampler", "QueueNegatives", "SentenceTransformerDistillKLDivLoss",
    "SentenceTransformerInfoNCELoss", "SentenceTransformerMarginMSELoss", "TopK", "TrainerBatchSampler", "Triplets",
    "__version__", "batch_hard", "grad_cache", "has_cuda", "info_nce", "listwise_kl", "margin_mse",
    "mine_hard_negatives", "mini_batches", "mix_hard_negatives", "own_candidates_info_nce", "semi_hard",
    "topk_from_candidates", "topk_from_scores", "topk_similarity", "trainer_batch_sampler", "triplet_margin_loss",
]
