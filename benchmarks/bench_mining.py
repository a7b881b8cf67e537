"""Benchmarks of the mining pipeline (a script, not a test).

Two sections, each run in fresh child processes so that time and memory are measured in isolation:

``corpus``: a (by default) 1,000,000 x 384 float32 corpus written as a .npy file and 20,000 queries.
  * ``raw``: the corpus loaded whole into memory, one ``topk_similarity`` call;
  * ``pipeline``: ``mine_hard_negatives`` with the corpus memory-mapped from the .npy path.
  Reports the throughput ratio pipeline / raw, whether both chose identical negatives, and the peak
  anonymous resident memory (RssAnon: resident memory that is not page cache or file mappings).

``st``: sentence-transformers' ``mine_hard_negatives`` (use_faiss=False, embeddings precomputed and
  served from its ``cache_folder``) against ours on the same embeddings, 16,384 x 100,000, d=384:
  time, peak RssAnon, identical negatives on the rows it fills, and ours with bfloat16 embeddings
  (recall@k against our float32 result).

Usage:
    python benchmarks/bench_mining.py corpus [--queries 20000] [--corpus 1000000] [--repeats 1]
    python benchmarks/bench_mining.py st [--queries 16384] [--corpus 100000] [--repeats 3]
The table is printed last; --json writes the raw numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

D = 384
SELECT = dict(num_negatives=8, relative_margin=0.05, skip_top=10, pool=100)
SAMPLE = dict(sampling="softmax", temperature=0.05, seed=1234)
FILTERS = {k: v for k, v in SELECT.items() if k != "num_negatives"}


def warm_up() -> None:
    """One tiny call of each entry point, so that one-time dispatch/registration costs stay out of
    the timings."""
    import torch

    import hnsample

    q, c = torch.randn(4, D), torch.randn(64, D)
    hnsample.topk_similarity(q, c, 8, metric="cosine", positives=torch.zeros(4, 1, dtype=torch.int64),
                             **FILTERS, **SAMPLE)
    hnsample.mine_hard_negatives(q, c, [[0]] * 4, device="cpu", progress=False, verbose=False, **SELECT)


# ----------------------------------------------------------------------------------------------------
# data


def make_data(directory: Path, b: int, n: int, seed: int = 0) -> None:
    """Corpus: standard normal rows. Query i is a noisy copy of its positive corpus row i * n // b, so
    positives score ~0.9 and unrelated documents ~0 +- 0.05 (cosine)."""
    directory.mkdir(parents=True, exist_ok=True)
    cpath = directory / f"corpus_{n}.npy"
    qpath = directory / f"queries_{b}_{n}.npy"
    ppath = directory / f"positives_{b}_{n}.npy"
    rng = np.random.default_rng(seed)
    if not cpath.exists():
        tmp = cpath.with_suffix(".tmp.npy")
        c = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, D))
        for i in range(0, n, 65536):
            c[i:i + 65536] = rng.standard_normal((min(n, i + 65536) - i, D), dtype=np.float32)
        c.flush()
        del c
        os.replace(tmp, cpath)
    if not qpath.exists():
        c = np.load(cpath, mmap_mode="r")
        pos = (np.arange(b, dtype=np.int64) * n) // b
        q = c[pos] + 0.5 * rng.standard_normal((b, D), dtype=np.float32)
        np.save(ppath, pos[:, None])
        np.save(qpath, q.astype(np.float32))


# ----------------------------------------------------------------------------------------------------
# child processes: one measurement each


class PeakAnon:
    """Samples RssAnon from /proc/self/status every 10 ms (the peak of memory that is not page cache)."""

    def __init__(self):
        self.peak = self.read()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.01)

    def __enter__(self):
        self.base = self.read()
        self.peak = self.base
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.read())


def child(kind: str, d: Path, b: int, n: int, out: Path) -> dict:
    import torch

    import hnsample

    qpath, cpath = d / f"queries_{b}_{n}.npy", d / f"corpus_{n}.npy"
    pos = np.load(d / f"positives_{b}_{n}.npy")
    res: dict = {"kind": kind}
    warm_up()
    if kind == "raw":
        q = torch.from_numpy(np.load(qpath))
        c = torch.from_numpy(np.load(cpath))  # whole corpus in memory
        with PeakAnon() as mem:
            t0 = time.perf_counter()
            r = hnsample.topk_similarity(q, c, SELECT["num_negatives"], metric="cosine", positives=pos,
                                         **FILTERS, **SAMPLE)
            res["seconds"] = time.perf_counter() - t0
        idx = r.indices.numpy()
    elif kind == "pipeline":
        with PeakAnon() as mem:
            t0 = time.perf_counter()
            r = hnsample.mine_hard_negatives(str(qpath), str(cpath), pos, device="cpu", progress=False,
                                             verbose=False, **SELECT, **SAMPLE)
            res["seconds"] = time.perf_counter() - t0
        idx = r.indices.numpy()
    elif kind in ("ours_fp32", "ours_bf16"):
        dtype = torch.float32 if kind == "ours_fp32" else torch.bfloat16
        q = torch.from_numpy(np.load(qpath)).to(dtype)
        c = torch.from_numpy(np.load(cpath)).to(dtype)
        with PeakAnon() as mem:
            t0 = time.perf_counter()
            r = hnsample.mine_hard_negatives(q, c, pos, device="cpu", progress=False, verbose=False, **SELECT)
            res["seconds"] = time.perf_counter() - t0
        idx = r.indices.numpy()
    elif kind == "st":
        idx, res["seconds"], mem = run_sentence_transformers(qpath, cpath, pos, d)
    else:
        raise ValueError(kind)
    res["peak_anon_mb"] = mem.peak / 2**20
    res["delta_anon_mb"] = (mem.peak - mem.base) / 2**20
    np.save(out, idx)
    return res


def run_sentence_transformers(qpath: Path, cpath: Path, pos: np.ndarray, d: Path):
    """sentence-transformers' mine_hard_negatives on precomputed embeddings: a model with no weights
    (only a Normalize module) and the embeddings placed in its cache_folder under the names it looks
    for, so no text is ever encoded. Returns ((B, k) corpus ids, -1 where it dropped the row)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, models
    from sentence_transformers.util import mine_hard_negatives as st_mine

    q, c = np.load(qpath), np.load(cpath)
    b, n = q.shape[0], c.shape[0]
    queries = [f"q{i}" for i in range(b)]
    corpus = [f"d{j}" for j in range(n)]
    model = SentenceTransformer(modules=[models.Normalize()], device="cpu")
    cache = d / f"st_cache_{b}_{n}"
    cache.mkdir(exist_ok=True)
    name = model.model_card_data.base_model or ""
    qh = hashlib.sha256(repr((name, None, None, queries)).encode()).hexdigest()
    ch = hashlib.sha256(repr((name, None, None, corpus)).encode()).hexdigest()
    np.save(cache / f"query_embeddings_{qh}.npy", q)
    np.save(cache / f"corpus_embeddings_{ch}.npy", c)
    del q, c
    ds = Dataset.from_dict({"query": queries, "positive": [corpus[int(p)] for p in pos[:, 0]]})
    k = SELECT["num_negatives"]
    with PeakAnon() as mem:
        t0 = time.perf_counter()
        out = st_mine(ds, model, corpus=corpus, range_min=SELECT["skip_top"],
                      range_max=SELECT["skip_top"] + SELECT["pool"],
                      relative_margin=SELECT["relative_margin"],
                      num_negatives=k, sampling_strategy="top", output_format="n-tuple", use_faiss=False,
                      cache_folder=str(cache), verbose=False)
        seconds = time.perf_counter() - t0
    idx = np.full((b, k), -1, dtype=np.int64)
    cols = out.to_dict()
    for r, qt in enumerate(cols["query"]):
        idx[int(qt[1:])] = [int(cols[f"negative_{t}"][r][1:]) for t in range(1, k + 1)]
    return idx, seconds, mem


# ----------------------------------------------------------------------------------------------------
# driver


def spawn(kind: str, d: Path, b: int, n: int) -> tuple[dict, np.ndarray]:
    out = d / f"idx_{kind}.npy"
    cmd = [sys.executable, __file__, "child", kind, "--dir", str(d), "--queries", str(b), "--corpus", str(n)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=d)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[7:]), np.load(out)


def measure(kinds: list[str], d: Path, b: int, n: int, repeats: int) -> dict:
    runs = {k: [] for k in kinds}
    idx = {}
    for _ in range(repeats):
        for k in kinds:  # interleaved, so that load changes on the shared machine hit all alike
            r, i = spawn(k, d, b, n)
            runs[k].append(r)
            idx[k] = i
            print(f"  {k}: {r['seconds']:.2f} s, peak RssAnon {r['peak_anon_mb']:.0f} MB", flush=True)
    summary = {k: {"median_s": statistics.median(r["seconds"] for r in v),
                   "runs_s": [r["seconds"] for r in v],
                   "peak_anon_mb": max(r["peak_anon_mb"] for r in v),
                   "delta_anon_mb": max(r["delta_anon_mb"] for r in v)} for k, v in runs.items()}
    return {"summary": summary, "indices": idx}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hit = total = 0
    for a, t in zip(found, truth, strict=True):
        ts = {int(x) for x in t if x >= 0}
        total += len(ts)
        hit += len(ts & {int(x) for x in a if x >= 0})
    return hit / max(total, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", choices=["corpus", "st", "child"])
    ap.add_argument("kind", nargs="?")
    ap.add_argument("--queries", type=int)
    ap.add_argument("--corpus", type=int)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/hnsample_bench_mining")
    ap.add_argument("--json", help="write the numbers here")
    a = ap.parse_args()
    d = Path(a.dir)
    if a.section == "child":
        res = child(a.kind, d, a.queries, a.corpus, d / f"idx_{a.kind}.npy")
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    import torch

    b = a.queries or (20000 if a.section == "corpus" else 16384)
    n = a.corpus or (1_000_000 if a.section == "corpus" else 100_000)
    print(f"data: {b} queries x {n} documents, d={D}; torch threads {torch.get_num_threads()}; "
          f"{os.cpu_count()} CPUs (shared machine)", flush=True)
    t0 = time.perf_counter()
    make_data(d, b, n)
    print(f"data ready in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    if a.section == "corpus":
        m = measure(["raw", "pipeline"], d, b, n, a.repeats)
        s, idx = m["summary"], m["indices"]
        ratio = s["raw"]["median_s"] / s["pipeline"]["median_s"]
        same = bool(np.array_equal(idx["raw"], idx["pipeline"]))
        rows.append(("raw topk_similarity (corpus in memory)", s["raw"], b / s["raw"]["median_s"], ""))
        rows.append(("mine_hard_negatives (mmap .npy)", s["pipeline"], b / s["pipeline"]["median_s"],
                     f"throughput {ratio:.2f}x raw; identical: {same}"))
        extra = {"throughput_ratio": ratio, "identical": same}
    else:
        m = measure(["st", "ours_fp32", "ours_bf16"], d, b, n, a.repeats)
        s, idx = m["summary"], m["indices"]
        filled = (idx["st"] >= 0).all(axis=1)
        same_rows = int((idx["st"][filled] == idx["ours_fp32"][filled]).all(axis=1).sum())
        r_bf16 = recall(idx["ours_bf16"], idx["ours_fp32"])
        sp32 = s["st"]["median_s"] / s["ours_fp32"]["median_s"]
        sp16 = s["st"]["median_s"] / s["ours_bf16"]["median_s"]
        rows.append(("sentence-transformers (fp32, use_faiss=False)", s["st"], b / s["st"]["median_s"],
                     f"filled {int(filled.sum())} of {b} rows"))
        rows.append(("hnsample fp32", s["ours_fp32"], b / s["ours_fp32"]["median_s"],
                     f"{sp32:.2f}x faster; identical on {same_rows}/{int(filled.sum())} rows it filled"))
        rows.append(("hnsample bf16", s["ours_bf16"], b / s["ours_bf16"]["median_s"],
                     f"{sp16:.2f}x faster; recall@k vs fp32 {r_bf16:.4f}"))
        extra = {"speedup_fp32": sp32, "speedup_bf16": sp16, "identical_rows": same_rows,
                 "st_filled_rows": int(filled.sum()), "bf16_recall": r_bf16}
    print()
    print(f"| {'run':<46} | {'median s':>9} | {'queries/s':>10} | {'peak RssAnon MB':>15} | "
          f"{'+MB in call':>11} | notes")
    print(f"|{'-' * 48}|{'-' * 11}|{'-' * 12}|{'-' * 17}|{'-' * 13}|------")
    for name, r, qps, note in rows:
        print(f"| {name:<46} | {r['median_s']:>9.2f} | {qps:>10.0f} | {r['peak_anon_mb']:>15.0f} | "
              f"{r['delta_anon_mb']:>11.0f} | {note}")
    if a.json:
        Path(a.json).write_text(json.dumps({"section": a.section, "queries": b, "corpus": n, "d": D,
                                            "repeats": a.repeats, "summary": s, **extra}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
