"""The peer benchmark report: hnsample compared with the tools people use today.

Runs in one process, section by section, over a sweep of sizes, and writes a markdown file of tables
(``benchmarks/report.md`` by default), one PNG per section (median time and peak extra memory against
the swept size, log-log) and the raw results as JSON. Run it with::

    python benchmarks/report.py            # full sweep: benchmarks/report.md, report_*.png, report.json
    python benchmarks/report.py --quick    # small sizes, a few seconds

Peers are optional (``pip install "hnsample[bench]"``): a peer that is not installed is listed in the
report as not run, never an error.

Sections live in :data:`SECTIONS`; each is one function registered with :func:`section`, which may name
the hnsample functions it needs (``requires``): when one is not importable in this build, the report
says so and runs the others. Each section returns :class:`Measurement` rows. Every method of a section
is checked against the section's reference method on the same inputs before it is timed: ``agreement``
is the fraction of result rows identical to the reference's.

Measurements: the call is run once to warm up, then ``repeats`` times; ``median_s`` is the median wall
time (after ``torch.cuda.synchronize`` on a GPU). ``peak_mb`` is the peak memory above what was in use
before one further call: on the CPU, the process's resident set size sampled every millisecond by a thread
(after returning freed heap memory to the OS, so earlier calls do not hide later ones); on a GPU,
``torch.cuda.max_memory_allocated``. Inputs are allocated before the measurement, so they do not count.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import hnsample

DEFAULT_OUT = Path("benchmarks") / "report.md"


# ----------------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Settings:
    """What every section gets: the device, the timed repeats, the sweep scale and the memory guard."""

    device: torch.device
    repeats: int = 3
    quick: bool = False
    seed: int = 0
    max_matrix_gb: float = 8.0  # a method that would materialize a larger score matrix is not run


@dataclass
class Measurement:
    """One (section, size, method) cell. ``skipped`` holds the reason when the method did not run."""

    section: str
    size: int
    method: str
    median_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    agreement: float | None = None
    skipped: str | None = None


class _PeakRSS:
    """Peak resident set size of this process while the context is open, sampled by a thread."""

    _page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self, period_s: float = 1e-3):
        self.period_s = period_s
        self.peak = 0
        self._stop = threading.Event()

    @classmethod
    def rss(cls) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * cls._page
        except OSError:  # not Linux: fall back to the monotone maximum (coarser, still an upper bound)
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period_s)

    def __enter__(self) -> _PeakRSS:
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _release_free_heap() -> None:
    """Hands freed malloc memory back to the OS so the next baseline RSS is honest (glibc only)."""
    name = ctypes.util.find_library("c")
    if name and platform.system() == "Linux":
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def measure(fn: Callable[[], Any], settings: Settings) -> tuple[Any, list[float], float]:
    """Runs fn once to warm up, then ``settings.repeats`` timed times.

    Returns (output of the warm-up call, wall times in seconds, peak extra memory in MB of one further
    call). See the module docstring for how memory is measured."""
    cuda = settings.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(settings.device)

    out = fn()
    sync()
    times: list[float] = []
    for _ in range(settings.repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    # Memory comes from one more call, so the sampling thread never competes for the GIL while timing.
    if cuda:
        torch.cuda.reset_peak_memory_stats(settings.device)
        base = torch.cuda.memory_allocated(settings.device)
        fn()
        sync()
        peak = torch.cuda.max_memory_allocated(settings.device) - base
    else:
        _release_free_heap()
        base = _PeakRSS.rss()
        with _PeakRSS() as sampler:
            fn()
        peak = sampler.peak - base
    return out, times, max(0.0, peak / 2**20)


@dataclass
class Method:
    """A competitor within a section. ``peer`` is the importable module it needs (None: torch or
    hnsample only); ``needs`` an hnsample attribute the method calls (None: always there);
    ``make(inputs)`` returns the zero-argument call that is timed; ``matrix_bytes(inputs)`` is the size of
    the dense score matrix the method builds, for the memory guard."""

    name: str
    make: Callable[[Any], Callable[[], Any]]
    peer: str | None = None
    install: str | None = None
    matrix_bytes: Callable[[Any], int] | None = None
    needs: str | None = None


def missing_peer(method: Method) -> str | None:
    """Why the method cannot run here (its peer package is not importable, or this build lacks the
    hnsample function it calls), or None."""
    if method.needs is not None and not hasattr(hnsample, method.needs):
        return f"this build has no hnsample.{method.needs}"
    if method.peer is None:
        return None
    try:
        importlib.import_module(method.peer)
    except ImportError as e:  # also covers a peer whose own import fails on this machine
        return f"{method.install or method.peer} is not installed ({type(e).__name__}: {e})".rstrip()
    return None


def run_sweep(
    section_name: str,
    sizes: Iterable[int],
    make_inputs: Callable[[int], Any],
    methods: list[Method],
    agree: Callable[[Any, Any], float],
    settings: Settings,
    log: Callable[[str], None] = print,
) -> list[Measurement]:
    """Times every method at every size; the first method that runs at a size is the reference for
    ``agreement`` at that size. Inputs are rebuilt per size and freed afterwards."""
    rows: list[Measurement] = []
    unavailable = {m.name: missing_peer(m) for m in methods}
    for size in sizes:
        inputs = make_inputs(size)
        reference = None
        for m in methods:
            row = Measurement(section_name, size, m.name)
            if unavailable[m.name]:
                row.skipped = unavailable[m.name]
            elif m.matrix_bytes is not None and m.matrix_bytes(inputs) > settings.max_matrix_gb * 2**30:
                gb = m.matrix_bytes(inputs) / 2**30
                row.skipped = f"needs a {gb:.1f} GB score matrix (> --max-matrix-gb)"
            else:
                out, times, peak = measure(m.make(inputs), settings)
                row.times_s, row.median_s, row.peak_mb = times, statistics.median(times), peak
                if reference is None:
                    reference = out
                row.agreement = agree(out, reference)
                del out
            rows.append(row)
            log(_format_progress(row))
        del inputs, reference
    return rows


def _format_progress(row: Measurement) -> str:
    if row.skipped:
        return f"  {row.section} {row.size:>9} {row.method:<22} not run: {row.skipped}"
    return (f"  {row.section} {row.size:>9} {row.method:<22} {row.median_s:9.4f} s  {row.peak_mb:9.1f} MB  "
            f"agreement {row.agreement:.3f}")


def rows_equal_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows of two (R, k) index tensors that are identical."""
    a, b = torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu()
    if a.shape != b.shape:
        return 0.0
    if a.numel() == 0:
        return 1.0
    return (a == b).reshape(a.shape[0], -1).all(dim=1).double().mean().item()


# ----------------------------------------------------------------------------------------------------
# Section registry


@dataclass(frozen=True)
class Section:
    """A report section: ``run(settings)`` returns its measurements. ``requires`` names hnsample
    attributes the section needs; ``size_label`` names the swept size on the x axis."""

    name: str
    title: str
    size_label: str
    description: str
    run: Callable[[Settings], list[Measurement]]
    requires: tuple[str, ...] = ()

    def missing(self) -> list[str]:
        return [name for name in self.requires if not hasattr(hnsample, name)]


SECTIONS: dict[str, Section] = {}


def section(name: str, title: str, size_label: str, requires: tuple[str, ...] = ()):
    """Registers the decorated ``fn(settings) -> list[Measurement]`` as a report section; its docstring
    is the description printed above the section's table."""

    def register(fn: Callable[[Settings], list[Measurement]]):
        if name in SECTIONS:
            raise ValueError(f"section {name!r} is registered twice")
        description = " ".join((fn.__doc__ or "").split())
        SECTIONS[name] = Section(name, title, size_label, description, fn, tuple(requires))
        return fn

    return register


# ----------------------------------------------------------------------------------------------------
# Section: hard negatives over a corpus


def _corpus_inputs(settings: Settings, b: int, d: int, p: int) -> Callable[[int], dict[str, Any]]:
    def make(n: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(settings.seed + n)
        q = torch.randn(b, d, generator=g).to(settings.device)
        c = torch.randn(n, d, generator=g).to(settings.device)
        pos = torch.randint(0, n, (b, p), generator=g).to(settings.device)
        return {"q": q, "c": c, "pos": pos}

    return make


def _masked_topk(q: torch.Tensor, c: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    s = q @ c.T
    s.scatter_(1, pos, float("-inf"))
    return s.topk(k, dim=1).indices


def _chunked_topk(q: torch.Tensor, c: torch.Tensor, pos: torch.Tensor, k: int, block: int) -> torch.Tensor:
    rows = max(1, block // max(1, c.shape[0]))
    return torch.cat([_masked_topk(q[i:i + rows], c, pos[i:i + rows], k) for i in range(0, q.shape[0], rows)])


def _faiss_topk(q: torch.Tensor, c: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """Exact inner-product search of k + P per query, then the positives are dropped (faiss has no
    per-query exclusion) and the first k survivors kept."""
    import faiss

    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c.float().cpu().numpy())
    _, ids = index.search(q.float().cpu().numpy(), k + pos.shape[1])
    ids = torch.from_numpy(ids)
    keep = ~(ids.unsqueeze(2) == pos.cpu().unsqueeze(1)).any(dim=2)
    # Stable sort of the keep mask moves the survivors to the front in their score order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k]
    return torch.where(keep.gather(1, order), ids.gather(1, order), -1)


@section("corpus_topk", "Top-k hard negatives over a corpus (positives excluded)", "N (corpus size)")
def corpus_topk(settings: Settings) -> list[Measurement]:
    """B queries against N candidates, d=384, float32, dot product; each query's one positive must not be
    returned; k=32 best per query. hnsample: topk_similarity (blocked matmul + fused selection, never
    B×N). torch naive: full B×N scores, scatter -inf at the positives, topk. torch chunked: the same per
    row chunk of 2^24 scores. faiss: IndexFlatIP (index built inside the timed call) searching k + P
    and dropping the positives afterwards."""
    b, d, k, p = (64, 32, 8, 1) if settings.quick else (1024, 384, 32, 1)
    sizes = [1000, 4000] if settings.quick else [10_000, 30_000, 100_000, 300_000]
    block = 1 << 24

    methods = [
        Method("hnsample",
               lambda x: lambda: hnsample.topk_similarity(x["q"], x["c"], k, positives=x["pos"]).indices),
        Method("torch naive", lambda x: lambda: _masked_topk(x["q"], x["c"], x["pos"], k),
               matrix_bytes=lambda x: 4 * x["q"].shape[0] * x["c"].shape[0]),
        Method("torch chunked", lambda x: lambda: _chunked_topk(x["q"], x["c"], x["pos"], k, block)),
        Method("faiss IndexFlatIP", lambda x: lambda: _faiss_topk(x["q"], x["c"], x["pos"], k),
               peer="faiss", install="faiss-cpu"),
    ]
    return run_sweep("corpus_topk", sizes, _corpus_inputs(settings, b, d, p), methods, rows_equal_fraction,
                     settings)


# ----------------------------------------------------------------------------------------------------
# Section: in-batch mining (batch-hard triplets)


def same_label_ids(labels: torch.Tensor) -> torch.Tensor:
    """(B, K) int64: for each row, the other rows with its label, padded with -1, K = largest group - 1.

    Built by sorting the labels, so O(B log B + B·K) time and memory (never B×B)."""
    b = labels.shape[0]
    if b == 0:
        return torch.empty((0, 0), dtype=torch.long, device=labels.device)
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    starts = torch.ones(b, dtype=torch.bool, device=labels.device)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    group = torch.cumsum(starts.long(), 0) - 1
    first = torch.nonzero(starts).squeeze(1)
    size = torch.diff(torch.cat([first, first.new_tensor([b])]))
    width = int(size.max().item())
    rank = torch.arange(b, device=labels.device) - first[group]
    table = torch.full((first.shape[0], width), -1, dtype=torch.long, device=labels.device)
    table[group, rank] = order
    members = table[group]  # (B, width) in sorted order; drop each row's own id
    members = torch.where(members == order.unsqueeze(1), torch.full_like(members, -1), members)
    members = torch.sort(members, dim=1, descending=True).values[:, : max(0, width - 1)]
    out = torch.empty_like(members)
    out[order] = members
    return out


def batch_hard_hnsample(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-hard mining without a B×B matrix: (hardest positive, hardest negative) per anchor by cosine,
    -1 where the anchor has none. Negatives: topk_similarity with the label mask (k=1); positives: the
    least similar of the anchor's same-label rows, gathered (O(B·K·d))."""
    neg = hnsample.topk_similarity(x, x, 1, metric="cosine", query_labels=labels, candidate_labels=labels)
    same = same_label_ids(labels)
    pos = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    if same.shape[1] > 0:
        xn = torch.nn.functional.normalize(x, dim=1)
        s = torch.einsum("bd,bkd->bk", xn, xn[same.clamp_min(0)]).masked_fill(same < 0, math.inf)
        hardest = same.gather(1, s.argmin(dim=1, keepdim=True)).squeeze(1)
        pos = torch.where((same >= 0).any(dim=1), hardest, pos)
    return pos, neg.indices[:, 0]


def batch_hard_naive(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch batch-hard miner: full B×B cosine matrix, masked min over positives and max over
    negatives."""
    xn = torch.nn.functional.normalize(x, dim=1)
    s = xn @ xn.T
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    pos_mask, neg_mask = same & ~eye, ~same
    pos = s.masked_fill(~pos_mask, math.inf).argmin(dim=1)
    neg = s.masked_fill(~neg_mask, -math.inf).argmax(dim=1)
    return torch.where(pos_mask.any(dim=1), pos, -1), torch.where(neg_mask.any(dim=1), neg, -1)


def batch_hard_pml(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch-metric-learning's BatchHardMiner with cosine similarity, scattered back to per-anchor
    (positive, negative) ids with -1 for the anchors it drops."""
    from pytorch_metric_learning import distances, miners

    a, p, n = miners.BatchHardMiner(distance=distances.CosineSimilarity())(x, labels)
    pos = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    neg = pos.clone()
    pos[a], neg[a] = p, n
    return pos, neg


Pair = tuple[torch.Tensor, torch.Tensor]


def batch_hard_toolkit(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hnsample.batch_hard (the toolkit's miner, which scores the whole batch at once), scattered back to
    per-anchor (positive, negative) ids with -1 for the anchors it drops."""
    t = hnsample.batch_hard(x, labels)
    pos = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    neg = pos.clone()
    pos[t.anchors], neg[t.anchors] = t.positives, t.negatives
    return pos, neg


def _agree_batch_hard(out: Pair, ref: Pair) -> float:
    """Fraction of anchors whose (positive, negative) pair equals the reference's, counted over the
    anchors that have both (pytorch-metric-learning drops the others)."""
    (p, n), (rp, rn) = out, ref
    valid = (rp >= 0) & (rn >= 0)
    if not bool(valid.any()):
        return 1.0
    return ((p == rp) & (n == rn))[valid].double().mean().item()


@section("in_batch_mining", "In-batch mining: batch-hard triplets", "B (batch size)")
def in_batch_mining(settings: Settings) -> list[Measurement]:
    """A batch of B embeddings (d=256, float32) with 4 per label (P×K sampling); for every anchor the
    hardest positive (least similar same-label item) and hardest negative (most similar other-label item)
    by cosine. hnsample: topk_similarity with the label mask for the negatives and a gather over each
    anchor's K-1 same-label items for the positives (no B×B matrix). hnsample.batch_hard: the toolkit's
    miner (B×B scores, fused selection), when the build has it. torch naive: full B×B matrix with masks.
    pytorch-metric-learning: BatchHardMiner(distance=CosineSimilarity())."""
    d, per_label = (16, 4) if settings.quick else (256, 4)
    sizes = [64, 256] if settings.quick else [1024, 4096, 16_384]

    def make(b: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(settings.seed + b)
        x = torch.randn(b, d, generator=g)
        labels = torch.randperm(b, generator=g) // per_label
        return {"x": x.to(settings.device), "labels": labels.to(settings.device)}

    square = lambda x: 4 * x["x"].shape[0] ** 2  # noqa: E731
    methods = [
        Method("hnsample", lambda x: lambda: batch_hard_hnsample(x["x"], x["labels"])),
        Method("torch naive", lambda x: lambda: batch_hard_naive(x["x"], x["labels"]), matrix_bytes=square),
        Method("hnsample.batch_hard", lambda x: lambda: batch_hard_toolkit(x["x"], x["labels"]),
               needs="batch_hard", matrix_bytes=square),
        Method("pytorch-metric-learning", lambda x: lambda: batch_hard_pml(x["x"], x["labels"]),
               peer="pytorch_metric_learning", install="pytorch-metric-learning", matrix_bytes=square),
    ]
    return run_sweep("in_batch_mining", sizes, make, methods, _agree_batch_hard, settings)


# ----------------------------------------------------------------------------------------------------
# Section: corpus mining against sentence-transformers

_MINE = {"num_negatives": 8, "relative_margin": 0.05, "skip_top": 10, "pool": 100}


def _mining_inputs(settings: Settings, b: int, d: int) -> Callable[[int], dict[str, Any]]:
    """Unit-norm corpus; query i = its positive corpus row i plus noise (cosine ~0.9 to it)."""

    def make(n: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(settings.seed + n)
        c = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
        pos = torch.randperm(n, generator=g)[:b]
        q = torch.nn.functional.normalize(c[pos] + 0.5 * torch.randn(b, d, generator=g) / d**0.5, dim=1)
        return {"q": q, "c": c, "pos": pos.unsqueeze(1), "st": None}

    return make


def mine_hnsample(x: dict[str, Any]) -> torch.Tensor:
    return hnsample.mine_hard_negatives(x["q"], x["c"], x["pos"], metric="cosine", device="cpu", progress=False,
                                        verbose=False, **_MINE).indices


def mine_sentence_transformers(x: dict[str, Any]) -> Callable[[], torch.Tensor]:
    """sentence-transformers' mine_hard_negatives (use_faiss=False) on the same precomputed embeddings:
    a weightless model (one Normalize module) whose cache_folder holds the embeddings under the names it
    looks up, so nothing is encoded. Set up once per size, outside the timed call."""
    import hashlib
    import tempfile

    import numpy as np
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, models
    from sentence_transformers.util import mine_hard_negatives as st_mine

    b, n = x["q"].shape[0], x["c"].shape[0]
    if x["st"] is None:
        queries = [f"q{i}" for i in range(b)]
        corpus = [f"d{j}" for j in range(n)]
        model = SentenceTransformer(modules=[models.Normalize()], device="cpu")
        cache = tempfile.mkdtemp(prefix="hnsample-report-st-")
        name = model.model_card_data.base_model or ""
        for kind, texts, emb in (("query", queries, x["q"]), ("corpus", corpus, x["c"])):
            digest = hashlib.sha256(repr((name, None, None, texts)).encode()).hexdigest()
            np.save(Path(cache) / f"{kind}_embeddings_{digest}.npy", emb.numpy())
        dataset = Dataset.from_dict({"query": queries, "positive": [corpus[int(p)] for p in x["pos"][:, 0]]})
        x["st"] = (model, corpus, cache, dataset)
    model, corpus, cache, dataset = x["st"]
    k = _MINE["num_negatives"]

    def call() -> torch.Tensor:
        out = st_mine(dataset, model, corpus=corpus, range_min=_MINE["skip_top"],
                      range_max=_MINE["skip_top"] + _MINE["pool"], relative_margin=_MINE["relative_margin"],
                      num_negatives=k, sampling_strategy="top", output_format="n-tuple", use_faiss=False,
                      cache_folder=cache, verbose=False)
        idx = torch.full((b, k), -1, dtype=torch.int64)
        cols = out.to_dict()
        for r, qt in enumerate(cols["query"]):
            idx[int(qt[1:])] = torch.tensor([int(cols[f"negative_{t}"][r][1:]) for t in range(1, k + 1)])
        return idx

    return call


@section("mine_hard_negatives", "Corpus mining vs sentence-transformers' mine_hard_negatives", "N (corpus size)",
         requires=("mine_hard_negatives",))
def mining_vs_sentence_transformers(settings: Settings) -> list[Measurement]:
    """B=4096 queries (d=384, float32, unit norm), each with one positive in a corpus of N; 8 negatives
    per query chosen among ranks 10..109 of the candidates that pass relative_margin=0.05 (cosine).
    hnsample: mine_hard_negatives (exact: the window is taken among eligible candidates). sentence-
    transformers: util.mine_hard_negatives(range_min=10, range_max=110, relative_margin=0.05,
    sampling_strategy="top", use_faiss=False) on the same precomputed embeddings (its window is over the
    raw ranking; where the margin removes few candidates the two agree)."""
    b, d = (64, 32) if settings.quick else (4096, 384)
    sizes = [1000, 3000] if settings.quick else [10_000, 30_000, 100_000]
    methods = [
        Method("hnsample", lambda x: lambda: mine_hnsample(x)),
        Method("sentence-transformers", mine_sentence_transformers, peer="sentence_transformers",
               install="sentence-transformers + datasets", matrix_bytes=lambda x: 4 * x["q"].shape[0] * x["c"].shape[0]),
    ]
    return run_sweep("mine_hard_negatives", sizes, _mining_inputs(settings, b, d), methods, rows_equal_fraction,
                     settings)


# ----------------------------------------------------------------------------------------------------
# Section: the contrastive loss


def _loss_and_grads(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], q: torch.Tensor,
                    d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward of loss_fn(q, d): (loss, dL/dq, dL/dd), detached."""
    q, d = q.detach().requires_grad_(), d.detach().requires_grad_()
    loss = loss_fn(q, d)
    gq, gd = torch.autograd.grad(loss, (q, d))
    return loss.detach(), gq, gd


def naive_info_nce(q: torch.Tensor, d: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain torch InfoNCE: the full (B, M) logits, cross entropy against the diagonal."""
    return torch.nn.functional.cross_entropy(q @ d.T / temperature, torch.arange(q.shape[0], device=q.device))


def _agree_loss(out, ref) -> float:
    """Fraction of query and document gradient rows within float32 tolerance of the reference (0 when
    the losses themselves differ)."""
    (loss, gq, gd), (rloss, rgq, rgd) = out, ref
    if not torch.allclose(loss, rloss, rtol=1e-4, atol=1e-5):
        return 0.0
    rows = [torch.isclose(g, r, rtol=1e-3, atol=1e-6).all(dim=1) for g, r in ((gq, rgq), (gd, rgd))]
    return torch.cat(rows).double().mean().item()


@section("info_nce", "InfoNCE loss, forward + backward", "B = M (queries = documents)",
         requires=("info_nce",))
def info_nce_loss(settings: Settings) -> list[Measurement]:
    """B query and B document embeddings (d=384, float32, unit norm), query i's positive is document i,
    every other document a negative, temperature 0.05; the loss and its gradients with respect to both.
    hnsample: info_nce (blocked, never B×B). torch naive: full B×B logits + cross_entropy + backward
    (what sentence-transformers' MultipleNegativesRankingLoss does)."""
    d, t = (32, 0.05) if settings.quick else (384, 0.05)
    sizes = [64, 256] if settings.quick else [1024, 4096, 16_384]

    def make(b: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(settings.seed + b)
        q = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
        c = torch.nn.functional.normalize(q + 0.5 * torch.randn(b, d, generator=g), dim=1)
        return {"q": q.to(settings.device), "d": c.to(settings.device)}

    ours = lambda q, c: hnsample.info_nce(q, c, temperature=t)  # noqa: E731
    naive = lambda q, c: naive_info_nce(q, c, t)  # noqa: E731
    methods = [
        Method("hnsample", lambda x: lambda: _loss_and_grads(ours, x["q"], x["d"])),
        Method("torch naive", lambda x: lambda: _loss_and_grads(naive, x["q"], x["d"]),
               matrix_bytes=lambda x: 3 * 4 * x["q"].shape[0] ** 2),
    ]
    return run_sweep("info_nce", sizes, make, methods, _agree_loss, settings)


# ----------------------------------------------------------------------------------------------------
# Output


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(results: dict[str, list[Measurement]], not_run: dict[str, str], settings: Settings,
             plots: dict[str, str], command: str) -> str:
    """The report as markdown: a header with the machine and command, then one table per section with
    time relative to hnsample (>1: hnsample is faster) and agreement with the section's reference."""
    lines = [
        "# hnsample peer benchmark report",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, device {settings.device}, hnsample {hnsample.__version__}",
        f"- command: `{command}`",
        f"- timing: 1 warm-up + {settings.repeats} timed calls, median; peak memory above the inputs in one "
        "more call (CPU: resident set size sampled every 1 ms; GPU: torch allocator peak)",
        "- vs hnsample: the method's median time over hnsample's at the same size (above 1: hnsample is "
        "faster)",
        "- agreement: fraction of result rows identical to those of the first method in the table",
        "",
    ]
    if settings.quick:
        lines[-1:-1] = ["- sizes: --quick (reduced shapes; the section texts give the full-size shapes)"]
    for name, text in not_run.items():
        lines += [f"## {SECTIONS[name].title if name in SECTIONS else name}", "", f"Not run: {text}", ""]
    for name, rows in results.items():
        sec = SECTIONS[name]
        lines += [f"## {sec.title}", "", sec.description, ""]
        lines += [f"| {sec.size_label} | method | median s | vs hnsample | peak extra MB | agreement |",
                  "|---:|---|---:|---:|---:|---:|"]
        ours = {r.size: r.median_s for r in rows if r.method == "hnsample" and r.median_s}
        for r in rows:
            if r.skipped:
                lines.append(f"| {r.size:,} | {r.method} | not run: {r.skipped} | | | |")
                continue
            ratio = r.median_s / ours[r.size] if ours.get(r.size) else None
            lines.append(f"| {r.size:,} | {r.method} | {_fmt(r.median_s, '.4f')} | {_fmt(ratio, '.2f')}× | "
                         f"{_fmt(r.peak_mb, '.1f')} | {_fmt(r.agreement, '.3f')} |")
        if name in plots:
            lines += ["", f"![{sec.title}]({plots[name]})"]
        lines.append("")
    return "\n".join(lines)


def plot(name: str, rows: list[Measurement], path: Path) -> str | None:
    """Writes time and peak memory against size (log-log), one line per method. Returns None when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sec = SECTIONS[name]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(r.method for r in rows))
    for method in methods:
        pts = [r for r in rows if r.method == method and r.median_s is not None]
        if not pts:
            continue
        xs = [r.size for r in pts]
        axes[0].plot(xs, [r.median_s for r in pts], marker="o", label=method)
        axes[1].plot(xs, [max(r.peak_mb, 0.1) for r in pts], marker="o", label=method)
    for ax, ylabel in zip(axes, ["median time (s)", "peak extra memory (MB)"], strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(sec.size_label)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(sec.title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def run_report(names: list[str], settings: Settings, out: Path, command: str,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the named sections and writes ``out`` (markdown), ``<stem>_<section>.png`` per section and
    ``<stem>.json`` next to it. Returns what was written and what was not run."""
    results: dict[str, list[Measurement]] = {}
    not_run: dict[str, str] = {}
    for name in names:
        sec = SECTIONS[name]
        missing = sec.missing()
        if missing:
            not_run[name] = f"needs hnsample.{', hnsample.'.join(missing)}, which this build does not have"
            log(f"{name}: not run ({not_run[name]})")
            continue
        log(f"{name}: {sec.title}")
        results[name] = sec.run(settings)
    plots = {}
    for name, rows in results.items():
        written = plot(name, rows, out.with_name(f"{out.stem}_{name}.png"))
        if written:
            plots[name] = written
        else:
            log("matplotlib is not installed: no plots (pip install matplotlib)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results, not_run, settings, plots, command))
    raw = {"settings": {**asdict(settings), "device": str(settings.device)},
           "not_run": not_run, "results": {k: [asdict(r) for r in v] for k, v in results.items()}}
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(raw, indent=1))
    log(f"wrote {out}, {json_path}" + "".join(f", {out.with_name(p)}" for p in plots.values()))
    return {"markdown": out, "json": json_path, "plots": [out.with_name(p) for p in plots.values()],
            "not_run": not_run, "results": results}


# ----------------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown output (default {DEFAULT_OUT})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (faiss-cpu always runs on the CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per cell; the median is reported")
    p.add_argument("--quick", action="store_true", help="small sizes: the whole report in seconds")
    p.add_argument("--max-matrix-gb", type=float, default=8.0,
                   help="skip a method whose dense score matrix would exceed this (default 8)")


def settings_from(args: argparse.Namespace) -> Settings:
    names = [s for s in args.sections.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise ValueError(f"sections: unknown {unknown}; choose from {list(SECTIONS)}")
    if args.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {args.repeats}")
    if not args.max_matrix_gb > 0:
        raise ValueError(f"max_matrix_gb must be > 0, got {args.max_matrix_gb}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {args.device!r} was asked for but torch sees no CUDA device")
    return Settings(device=device, repeats=args.repeats, quick=args.quick, max_matrix_gb=args.max_matrix_gb)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ValueError as e:
        print(f"report.py: {e}", file=sys.stderr)
        return 2
    names = [s for s in args.sections.split(",") if s]
    command = " ".join(["python benchmarks/report.py", *sys.argv[1:]])
    run_report(names, settings, args.out, command)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
