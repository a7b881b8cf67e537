"""``hnsample mine``: mine hard negatives for precomputed query/corpus embeddings from the command line
and write them to parquet, jsonl or npz."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _device(value: str) -> str | list[str]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.epilog = ("example: hnsample mine --queries Q.npy --corpus C.npy --positives qrels.tsv "
                     "--num-negatives 8 --relative-margin 0.05 --skip-top 10 --pool 100 --sampling softmax "
                     "--temperature 0.05 --out negatives.parquet --checkpoint-dir ckpt/")
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--queries", required=True, metavar="Q.npy",
                    help="(B, d) query embeddings as a .npy file (memory-mapped, never loaded whole)")
    io.add_argument("--corpus", required=True, metavar="C.npy",
                    help="(N, d) corpus embeddings as a .npy file (memory-mapped, read shard by shard)")
    io.add_argument("--positives", metavar="PATH",
                    help="positives: a qrels TSV (query_id<TAB>doc_id; BEIR 3-column and TREC 4-column "
                         "files accepted, relevance <= 0 skipped) or a .npy (B, P) int array of corpus "
                         "rows (-1 pads)")
    io.add_argument("--query-ids", metavar="FILE",
                    help="text file with the id of each query row, one per line, for the qrels "
                         "(default: the row number)")
    io.add_argument("--corpus-ids", metavar="FILE",
                    help="text file with the id of each corpus row, one per line, for the qrels "
                         "(default: the row number)")
    io.add_argument("--out", required=True, metavar="PATH",
                    help="output file: .parquet (needs pyarrow), .jsonl or .npz")
    io.add_argument("--checkpoint-dir", metavar="DIR",
                    help="resumable run: each finished query batch is written here atomically; rerunning "
                         "the same command skips finished batches")

    sel = parser.add_argument_group("selection (same meaning as hnsample.topk_similarity)")
    sel.add_argument("--num-negatives", type=int, default=8, help="negatives per query (k)")
    sel.add_argument("--metric", choices=["cosine", "dot"], default="cosine",
                     help="similarity: cosine, or the raw dot product")
    sel.add_argument("--absolute-margin", type=float, metavar="M",
                     help="keep a candidate only if score <= p - M (p: the query's lowest positive score)")
    sel.add_argument("--relative-margin", type=float, metavar="M",
                     help="keep a candidate only if score <= p - |p| * M")
    sel.add_argument("--min-score", type=float, help="keep a candidate only if score >= this")
    sel.add_argument("--max-score", type=float, help="keep a candidate only if score <= this")
    sel.add_argument("--skip-top", type=int, default=0,
                     help="drop the first N eligible candidates (likely unlabeled positives)")
    sel.add_argument("--pool", type=int,
                     help="choose among the next N eligible candidates after --skip-top (default: all)")
    sel.add_argument("--sampling", choices=["top", "uniform", "softmax"], default="top",
                     help="take the pool's best, sample uniformly, or sample with p ~ exp(score / T)")
    sel.add_argument("--temperature", type=float, default=1.0, help="T for --sampling softmax")
    sel.add_argument("--seed", type=int,
                     help="sampling seed (default: drawn once, and reused from --checkpoint-dir on resume)")

    run = parser.add_argument_group("execution")
    run.add_argument("--device", type=_device, default="auto",
                     help="cpu, cuda, cuda:1, a comma-separated list of devices, or auto "
                          "(all GPUs, else CPU)")
    run.add_argument("--query-batch-size", type=int,
                     help="queries per batch and per checkpoint file (default 16384)")
    run.add_argument("--corpus-shard-size", type=int,
                     help="corpus rows read at a time (default: 256 MiB of rows)")
    run.add_argument("--block-size", type=int, help="score elements per block (default 2**24)")
    run.add_argument("--filter-stats", action="store_true",
                     help="also count exactly how many candidates each filter removed")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--quiet", action="store_true", help="no summary table")


def run(args: argparse.Namespace) -> int:
    """Mines and writes the result. Every error about the inputs (ValueError, TypeError, or an OSError
    reading or writing a file) is printed as one ``hnsample mine: error: ...`` line with exit status 2,
    as argparse reports a bad flag; anything else is a bug and keeps its traceback."""
    from .mining import mine_hard_negatives
    from .mining_io import load_npy
    from .result_files import check_result_path

    try:
        check_result_path(args.out)  # before mining, not after hours of it
        positives = args.positives
        if positives is not None and Path(positives).suffix == ".npy":
            positives = load_npy("positives", positives)
        result = mine_hard_negatives(
            args.queries, args.corpus, positives, num_negatives=args.num_negatives, metric=args.metric,
            absolute_margin=args.absolute_margin, relative_margin=args.relative_margin,
            min_score=args.min_score, max_score=args.max_score, skip_top=args.skip_top, pool=args.pool,
            sampling=args.sampling, temperature=args.temperature, seed=args.seed, device=args.device,
            query_batch_size=args.query_batch_size, corpus_shard_size=args.corpus_shard_size,
            block_size=args.block_size, checkpoint_dir=args.checkpoint_dir,
            filter_statistics=args.filter_stats, progress=not args.no_progress, verbose=not args.quiet,
            query_ids=args.query_ids, corpus_ids=args.corpus_ids,
        )
        result.save(args.out)
    except (ValueError, TypeError, OSError) as e:
        print(f"hnsample mine: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {result.indices.shape[0]} rows of {result.num_negatives} negatives to {args.out}")
    return 0
