"""``hnsample mine``: mine hard negatives for precomputed query/corpus embeddings (or select them from a
reranker's candidate scores) from the command line, write them to parquet, jsonl or npz, and, given the
texts, write a sentence-transformers training dataset too."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _device(value: str) -> str | list[str]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  hnsample mine --queries Q.npy --corpus C.npy --positives qrels.tsv --num-negatives 8 \\\n"
        "      --relative-margin 0.05 --skip-top 10 --pool 100 --out negatives.parquet --checkpoint-dir ckpt/\n"
        "  hnsample mine --queries Q.npy --corpus C.npy --positives qrels.tsv \\\n"
        "      --queries-text queries.jsonl --corpus-text corpus.jsonl --out negatives.jsonl \\\n"
        "      --dataset-out train.jsonl --dataset-format n-tuple\n"
        "  hnsample mine --candidates-scores reranked.tsv --positives qrels.tsv --query-ids qids.txt \\\n"
        "      --corpus-ids dids.txt --relative-margin 0.05 --out negatives.jsonl")
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--queries", metavar="Q.npy",
                    help="(B, d) query embeddings as a .npy file (memory-mapped, never loaded whole)")
    io.add_argument("--corpus", metavar="C.npy",
                    help="(N, d) corpus embeddings as a .npy file (memory-mapped, read shard by shard)")
    io.add_argument("--positives", metavar="PATH",
                    help="positives: a qrels file (query_id doc_id, BEIR's 3 columns, TREC's 4; tab- or "
                         "space-separated; relevance <= 0 skipped) or a .npy (B, P) int array of corpus rows "
                         "(-1 pads)")
    io.add_argument("--query-ids", metavar="FILE",
                    help="text file with the id of each query row, one per line; outputs name queries by "
                         "these ids (default: the row number, or the ids of --queries-text)")
    io.add_argument("--corpus-ids", metavar="FILE",
                    help="text file with the id of each corpus row, one per line; outputs name documents by "
                         "these ids (default: the row number, or the ids of --corpus-text)")
    io.add_argument("--candidates-scores", metavar="PATH",
                    help="select from a reranker's scores instead of mining the embeddings: per query, the "
                         "listed candidates and their scores (lines 'query_id doc_id score' or a TREC run, "
                         ".jsonl {query, candidates, scores}, or .npz candidate_ids/scores); margins measure "
                         "from the listed scores of the positives. --queries/--corpus then only give the sizes")
    io.add_argument("--out", required=True, metavar="PATH",
                    help="output file: .parquet (needs pyarrow), .jsonl (metadata in PATH.meta.json) or .npz")
    io.add_argument("--checkpoint-dir", metavar="DIR",
                    help="resumable run: each finished query batch is written here atomically; rerunning "
                         "the same command skips finished batches (also with or without --filter-stats)")

    text = parser.add_argument_group("texts and the sentence-transformers dataset")
    text.add_argument("--queries-text", metavar="PATH",
                      help="query texts: TSV 'id<TAB>text' (or one text per line) or JSONL {_id, text}; "
                           "placed by --query-ids when given, else line i is row i")
    text.add_argument("--corpus-text", metavar="PATH",
                      help="corpus texts, same formats; with them, a document whose text equals a positive's "
                           "(up to spacing and case) is never a negative")
    text.add_argument("--keep-positive-duplicates", action="store_true",
                      help="let documents that repeat a positive's text be negatives")
    text.add_argument("--dataset-out", metavar="PATH",
                      help="also write a sentence-transformers dataset (.jsonl or .parquet) of the texts; "
                           "needs --queries-text and --corpus-text")
    text.add_argument("--dataset-format", choices=["triplet", "n-tuple", "labeled-pair", "labeled-list"],
                      default="triplet", help="its layout, as sentence-transformers' output_format "
                                              "(default: triplet)")
    text.add_argument("--dataset-scores", action="store_true",
                      help="add the scores (sentence-transformers' output_scores=True)")

    sel = parser.add_argument_group("selection (same meaning as hnsample.topk_similarity)")
    sel.add_argument("--num-negatives", type=int, default=8, help="negatives per query, k (default: 8)")
    sel.add_argument("--metric", choices=["cosine", "dot"], default="cosine",
                     help="similarity: cosine, or the raw dot product (default: cosine)")
    sel.add_argument("--absolute-margin", type=float, metavar="M",
                     help="keep a candidate only if score <= p - M (p: the query's lowest positive score)")
    sel.add_argument("--relative-margin", type=float, metavar="M",
                     help="keep a candidate only if score <= p - |p| * M")
    sel.add_argument("--min-score", type=float, help="keep a candidate only if score >= this")
    sel.add_argument("--max-score", type=float, help="keep a candidate only if score <= this")
    sel.add_argument("--skip-top", type=int, default=0,
                     help="drop the first N eligible candidates, likely unlabeled positives (default: 0)")
    sel.add_argument("--pool", type=int,
                     help="choose among the next N eligible candidates after --skip-top (default: all)")
    sel.add_argument("--sampling", choices=["top", "uniform", "softmax"], default="top",
                     help="take the pool's best, sample uniformly, or sample with p ~ exp(score / T) "
                          "(default: top)")
    sel.add_argument("--temperature", type=float,
                     help="T for --sampling softmax (default: 0.05, for cosine scores; with --metric dot or "
                          "--candidates-scores give it explicitly)")
    sel.add_argument("--seed", type=int,
                     help="sampling seed (default: drawn once, and reused from --checkpoint-dir on resume)")

    run_group = parser.add_argument_group("execution")
    run_group.add_argument("--device", type=_device, default="auto",
                           help="cpu, cuda, cuda:1, a comma-separated list of devices, or auto (all GPUs, else "
                                "the CPU; the default)")
    run_group.add_argument("--query-batch-size", type=int,
                           help="queries per batch and per checkpoint file (default: 16384)")
    run_group.add_argument("--corpus-shard-size", type=int,
                           help="corpus rows read at a time (default: 256 MiB of rows)")
    run_group.add_argument("--block-size", type=int, help="score elements per block (default: 2**22)")
    run_group.add_argument("--filter-stats", action="store_true",
                           help="also count exactly how many candidates each filter removed")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_group.add_argument("--quiet", action="store_true", help="no summary table")


def _rows(path: str | None) -> int | None:
    """The number of rows of a .npy file, read from its header."""
    if path is None:
        return None
    from .mining_io import load_npy

    return int(load_npy("embeddings", path, mmap_mode="r").shape[0])


def _sizes(args: argparse.Namespace, qids: list[str] | None, cids: list[str] | None,
           qtexts: list[str] | None, ctexts: list[str] | None) -> tuple[int, int]:
    """(B, N) for a --candidates-scores run: from the id files, the embeddings or the texts."""
    b = next((x for x in (len(qids) if qids else None, _rows(args.queries), len(qtexts) if qtexts else None)
              if x is not None), None)
    n = next((x for x in (len(cids) if cids else None, _rows(args.corpus), len(ctexts) if ctexts else None)
              if x is not None), None)
    if b is None:
        raise ValueError("--candidates-scores needs the number of queries: give --query-ids, --queries or "
                         "--queries-text")
    if n is None:
        raise ValueError("--candidates-scores needs the number of corpus rows: give --corpus-ids, --corpus or "
                         "--corpus-text")
    return b, n


def write_dataset(path: str, data: Any) -> None:
    """Writes a sentence-transformers dataset (a datasets.Dataset or a dict of columns) as .jsonl (one
    object per row) or .parquet, atomically."""
    import json

    from .checkpoint import atomic_write

    columns = data.to_dict() if hasattr(data, "to_dict") else data
    p = Path(path)
    keys = list(columns)
    if p.suffix.lower() == ".jsonl":
        def write(f):
            for row in zip(*(columns[k] for k in keys), strict=True):
                f.write((json.dumps(dict(zip(keys, row, strict=True))) + "\n").encode())
        atomic_write(p, write)
    elif p.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(columns)
        atomic_write(p, lambda f: pq.write_table(table, f))
    else:
        raise ValueError(f"--dataset-out must end in .jsonl or .parquet, got {path!r}")


def run(args: argparse.Namespace) -> int:
    """Mines and writes the result. Every error about the inputs (ValueError, TypeError, or an OSError
    reading or writing a file) is printed as one ``hnsample mine: error: ...`` line with exit status 2,
    as argparse reports a bad flag; anything else is a bug and keeps its traceback."""
    from .mining import mine_hard_negatives
    from .mining_io import check_id_list, load_npy, read_candidate_scores, read_ids, read_qrels
    from .result_files import check_result_path
    from .texts import positive_duplicates

    try:
        check_result_path(args.out)  # before mining, not after hours of it
        if args.dataset_out is not None:
            if Path(args.dataset_out).suffix.lower() not in (".jsonl", ".parquet"):
                raise ValueError(f"--dataset-out must end in .jsonl or .parquet, got {args.dataset_out!r}")
            if args.queries_text is None or args.corpus_text is None:
                raise ValueError("--dataset-out needs --queries-text and --corpus-text")
        if args.candidates_scores is None and (args.queries is None or args.corpus is None):
            raise ValueError("--queries and --corpus are required (unless --candidates-scores is given)")
        qids = None if args.query_ids is None else read_ids("query_ids", args.query_ids)
        cids = None if args.corpus_ids is None else read_ids("corpus_ids", args.corpus_ids)
        b = _rows(args.queries) if args.queries else (len(qids) if qids else None)
        n = _rows(args.corpus) if args.corpus else (len(cids) if cids else None)
        qtexts = ctexts = None
        if args.queries_text is not None:
            qtexts, qids = _texts("queries_text", args.queries_text, qids, b)
        if args.corpus_text is not None:
            ctexts, cids = _texts("corpus_text", args.corpus_text, cids, n)
        positives = args.positives
        if args.candidates_scores is not None:
            b, n = _sizes(args, qids, cids, qtexts, ctexts)
        if qids is not None:
            check_id_list("query_ids", qids, b)
        if cids is not None:
            check_id_list("corpus_ids", cids, n)
        if positives is not None and Path(positives).suffix == ".npy":
            positives = load_npy("positives", positives)
        elif positives is not None:
            positives = read_qrels(positives, b, n, qids, cids)
        exclude = None
        if ctexts is not None and positives is not None and not args.keep_positive_duplicates:
            rows = positives.tolist() if hasattr(positives, "tolist") else positives
            exclude = positive_duplicates([[int(j) for j in r] for r in rows], ctexts)
        select = dict(num_negatives=args.num_negatives, absolute_margin=args.absolute_margin,
                      relative_margin=args.relative_margin, min_score=args.min_score, max_score=args.max_score,
                      skip_top=args.skip_top, pool=args.pool, sampling=args.sampling, seed=args.seed)
        if args.candidates_scores is not None:
            from .rerank import select_from_candidate_lists

            if args.sampling == "softmax" and args.temperature is None:
                raise ValueError("--sampling softmax with --candidates-scores needs --temperature (a reranker's "
                                 "scores have no fixed scale)")
            ids, scores = read_candidate_scores(args.candidates_scores, b, n, qids, cids)
            result = select_from_candidate_lists(
                ids, scores, positives, num_corpus=n, exclude=exclude, filter_statistics=args.filter_stats,
                temperature=1.0 if args.temperature is None else args.temperature, **select)
            result.query_ids, result.corpus_ids = qids, cids
            if not args.quiet:
                print(result.summary())
        else:
            result = mine_hard_negatives(
                args.queries, args.corpus, positives, metric=args.metric, temperature=args.temperature,
                exclude=exclude, device=args.device, query_batch_size=args.query_batch_size,
                corpus_shard_size=args.corpus_shard_size, block_size=args.block_size,
                checkpoint_dir=args.checkpoint_dir, filter_statistics=args.filter_stats,
                progress=not args.no_progress, verbose=not args.quiet, query_ids=qids, corpus_ids=cids, **select)
        result.save(args.out)
        if args.dataset_out is not None:
            write_dataset(args.dataset_out, result.to_sentence_transformers(
                qtexts, ctexts, args.dataset_format, output_scores=args.dataset_scores))
    except (ValueError, TypeError, OSError) as e:
        print(f"hnsample mine: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {result.indices.shape[0]} rows of {result.num_negatives} negatives to {args.out}"
              + (f" and a {args.dataset_format} dataset to {args.dataset_out}" if args.dataset_out else ""))
    return 0


def _texts(name: str, path: str, ids: list[str] | None, rows: int | None) -> tuple[list[str], list[str] | None]:
    from .texts import read_texts, texts_for_rows

    if rows is None and ids is None:
        file_ids, texts = read_texts(name, path)
        return texts, file_ids
    return texts_for_rows(name, path, ids, rows if rows is not None else len(ids))
