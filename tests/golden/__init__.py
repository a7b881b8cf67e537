"""Golden outputs of hnsample's public API (see corpus.py). Importing the package registers every entry,
in a fixed order."""

from . import info_nce, pipeline, samplers, topk  # noqa: F401
