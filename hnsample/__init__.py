"""hnsample: exact, memory-flat hard-negative mining, filtering and sampling for PyTorch."""

from ._ext import has_cuda
from .mining import MinedNegatives, mine_hard_negatives
from .ops.topk import TopK, topk_from_scores, topk_similarity

__version__ = "0.1.0"

__all__ = ["TopK", "has_cuda", "topk_from_scores", "topk_similarity", "__version__"]
__all__ += ["MinedNegatives", "mine_hard_negatives"]
