"""hnsample: exact, memory-flat hard-negative mining, filtering and sampling for PyTorch."""

from ._ext import has_cuda
from .losses import InfoNCELoss, SentenceTransformerInfoNCELoss
from .ops.info_nce import info_nce
from .ops.topk import TopK, topk_from_scores, topk_similarity

__version__ = "0.1.0"

__all__ = [
    "InfoNCELoss",
    "SentenceTransformerInfoNCELoss",
    "TopK",
    "has_cuda",
    "info_nce",
    "topk_from_scores",
    "topk_similarity",
    "__version__",
]
