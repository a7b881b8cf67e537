"""Encoding texts for mining: a sentence-transformers model or any callable (texts -> embeddings), with
a progress bar and an optional on-disk cache that a re-run reads instead of encoding again and that an
interrupted encoding resumes from.

Cache layout (``cache_folder``): ``<role>_embeddings_<key>.npy`` once complete (read memory-mapped), and
while encoding ``.<role>_embeddings_<key>.partial/rows_<start>_<end>.npy``, one file per
:data:`CACHE_CHUNK` texts, each written atomically; the key is the SHA-256 of the model's identity, the
prompt and the texts (see :func:`cache_key`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_write
from .mining_io import PathLike

CACHE_CHUNK = 8192  # texts per resumable cache file


def is_sentence_transformer(model: Any) -> bool:
    """Duck-typed: an object with sentence-transformers' ``encode`` (and ``similarity_fn_name``)."""
    return hasattr(model, "encode") and hasattr(model, "similarity_fn_name") and isinstance(model, torch.nn.Module)


def _weights_digest(module: torch.nn.Module, h: Any) -> None:
    """Feeds h the names, shapes, dtypes and 256 evenly spaced values of every parameter and buffer: a
    fine-tuned checkpoint of the same architecture differs in them, at a cost independent of the
    model's size."""
    for name, t in sorted(list(module.named_parameters()) + list(module.named_buffers()), key=lambda x: x[0]):
        flat = t.detach().reshape(-1)
        pick = torch.linspace(0, max(flat.numel() - 1, 0), steps=min(flat.numel(), 256)).long()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(flat[pick.to(flat.device)].to(torch.float64).cpu().numpy().tobytes())


def model_identity(model: Any, cache_key: str | None = None) -> str:
    """A string that changes when the model would embed differently: ``cache_key`` if given; else, for a
    sentence-transformers model or a torch module (or a bound method of one), its class, its repr
    (architecture, max_seq_length, pooling, normalization), its prompts and a digest of its weights.
    Any other callable has no identity hnsample can see: ValueError asking for ``cache_key``."""
    if cache_key is not None:
        if not isinstance(cache_key, str) or not cache_key:
            raise TypeError(f"cache_key must be a non-empty str, got {cache_key!r}")
        return "key:" + cache_key
    owner = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    if not isinstance(owner, torch.nn.Module):
        raise ValueError("cache_folder needs the model's identity, and a plain callable has none that hnsample can "
                         "see (its weights may change between runs): pass cache_key= naming the model and its version")
    h = hashlib.sha256()
    h.update(f"{type(owner).__module__}.{type(owner).__qualname__}|{getattr(model, '__name__', '')}|".encode())
    h.update(repr(owner).encode())
    h.update(json.dumps(getattr(owner, "prompts", None), sort_keys=True, default=str).encode())
    h.update(str(getattr(owner, "default_prompt_name", None)).encode())
    _weights_digest(owner, h)
    return "module:" + h.hexdigest()


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256(str(len(texts)).encode())
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cache_key(identity: str, role: str, prompt: str | None, prompt_name: str | None, texts: Sequence[str]) -> str:
    """The cache key: SHA-256 of the model identity, the role ("query" or "document": sentence-transformers
    encodes them with different default prompts), the prompt and prompt name, and the texts."""
    payload = json.dumps([identity, role, prompt, prompt_name, texts_digest(texts)])
    return hashlib.sha256(payload.encode()).hexdigest()[:40]


def _normalized(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)


class Encoder:
    """Embeds texts for one role ("query" or "document") with a sentence-transformers model (its
    ``encode_query`` / ``encode_document`` with ``normalize_embeddings=True``, as sentence-transformers'
    own mining does) or a callable ``f(list[str]) -> (n, d)`` array or tensor (L2-normalized here;
    ``prompt`` is prepended to each text, ``prompt_name`` needs a sentence-transformers model)."""

    def __init__(self, model: Any, role: str, *, prompt: str | None = None, prompt_name: str | None = None,
                 batch_size: int = 32, pool: Any = None):
        if not callable(model) and not is_sentence_transformer(model):
            raise TypeError(f"model must be a SentenceTransformer or a callable texts -> embeddings, got "
                            f"{type(model).__name__}")
        self.model, self.role, self.prompt, self.prompt_name = model, role, prompt, prompt_name
        self.batch_size, self.pool = batch_size, pool
        self.st = is_sentence_transformer(model)
        if not self.st and prompt_name is not None:
            raise ValueError(f"{'query' if role == 'query' else 'corpus'}_prompt_name needs a sentence-transformers "
                             "model (a callable has no named prompts); pass the prompt text as "
                             f"{'query' if role == 'query' else 'corpus'}_prompt")

    def __call__(self, texts: list[str], show_progress_bar: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if self.st:
            fn = getattr(self.model, "encode_query" if self.role == "query" else "encode_document", self.model.encode)
            extra = {} if self.pool is None else {"pool": self.pool}
            out = fn(texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                     show_progress_bar=show_progress_bar, prompt_name=self.prompt_name, prompt=self.prompt, **extra)
            return np.asarray(out, dtype=np.float32)
        inputs = texts if self.prompt is None else [self.prompt + t for t in texts]
        parts = [_as_matrix(self.model(inputs[i:i + self.batch_size]), len(inputs[i:i + self.batch_size]))
                 for i in range(0, len(inputs), self.batch_size)]
        return _normalized(np.concatenate(parts)).astype(np.float32)


def _as_matrix(out: Any, n: int) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        out = out.detach().to(torch.float32).cpu().numpy()
    out = np.asarray(out, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != n:
        raise ValueError(f"the encoder must return one embedding per text, shape ({n}, d), got {out.shape}")
    return out


_CHUNK_NAME = re.compile(r"rows_(\d+)_(\d+)\.npy")


def encode_texts(encoder: Encoder, texts: list[str], *, cache_folder: PathLike | None = None,
                 identity: str | None = None, progress: bool = True, desc: str = "Encoding") -> np.ndarray:
    """(len(texts), d) float32 embeddings. Without ``cache_folder`` one call of the encoder (a
    sentence-transformers model shows its own progress bar). With it: the cached file when the key
    matches (no encoding), else the texts are encoded in chunks of :data:`CACHE_CHUNK`, each written to
    the cache as soon as it is done, with a progress bar; chunks left by an interrupted run with the same
    key are read instead of encoded again. The result is then memory-mapped from the cache file."""
    if cache_folder is None:
        return encoder(texts, show_progress_bar=progress)
    if identity is None:
        raise ValueError("encode_texts: a cache needs the model identity")
    folder = Path(cache_folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cache_folder is not a directory: {str(cache_folder)!r}")
    key = cache_key(identity, encoder.role, encoder.prompt, encoder.prompt_name, texts)
    final = folder / f"{encoder.role}_embeddings_{key}.npy"
    if final.is_file():
        try:
            cached = np.load(final, mmap_mode="r", allow_pickle=False)
            if cached.ndim == 2 and cached.shape[0] == len(texts) and cached.dtype == np.float32:
                return cached
        except (ValueError, OSError, EOFError):
            pass  # damaged: encoded again below and replaced
    partial = folder / f".{encoder.role}_embeddings_{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    done: dict[int, Path] = {}
    for p in partial.iterdir():
        m = _CHUNK_NAME.fullmatch(p.name)
        if m and int(m.group(2)) == min(len(texts), int(m.group(1)) + CACHE_CHUNK):
            done[int(m.group(1))] = p
    bar = _bar(len(texts), progress, desc)
    chunks: list[Path] = []
    try:
        for start in range(0, len(texts), CACHE_CHUNK):
            end = min(len(texts), start + CACHE_CHUNK)
            path = done.get(start)
            if path is not None and _readable_chunk(path, end - start):
                chunks.append(path)
            else:
                emb = encoder(texts[start:end])
                path = partial / f"rows_{start}_{end}.npy"
                atomic_write(path, lambda f, emb=emb: np.save(f, emb))
                chunks.append(path)
            if bar is not None:
                bar.update(end - start)
    finally:
        if bar is not None:
            bar.close()
    dims = {np.load(p, mmap_mode="r").shape[1] for p in chunks}
    if len(dims) > 1:
        raise ValueError(f"cached chunks in {str(partial)!r} disagree on the embedding dimension {sorted(dims)}; "
                         "delete that folder")
    d = dims.pop() if dims else 0
    tmp = folder / f".{final.name}.assembling.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(texts), d))
    for start, p in zip(range(0, len(texts), CACHE_CHUNK), chunks, strict=True):
        part = np.load(p, mmap_mode="r")
        out[start:start + part.shape[0]] = part
    out.flush()
    del out
    tmp.replace(final)
    shutil.rmtree(partial, ignore_errors=True)
    return np.load(final, mmap_mode="r", allow_pickle=False)


def _readable_chunk(path: Path, rows: int) -> bool:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return False
    return a.ndim == 2 and a.shape[0] == rows and a.dtype == np.float32


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="text", desc=desc, dynamic_ncols=True)


EncoderLike = Callable[[list[str]], Any]
