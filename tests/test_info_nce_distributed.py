"""info_nce(gather=True) with 2 gloo processes equals one process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hnsample

WORLD, B_LOCAL, M_LOCAL, D = 2, 5, 8, 6

# Run as a separate interpreter (cwd outside the checkout, so the installed hnsample is imported).
WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    import hnsample
    rank, world, init_file, data_file, out_file = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    data = torch.load(data_file)
    b, m = data["b_local"], data["m_local"]
    q = data["queries"][rank * b:(rank + 1) * b].clone().requires_grad_()
    c = data["docs"][rank * m:(rank + 1) * m].clone().requires_grad_()
    out = {}
    for name, kw in data["options"].items():
        kw = dict(kw)
        for key, rows in (("doc_ids", m), ("doc_labels", m), ("guide_docs", m)):
            if key in kw:
                kw[key] = kw[key][rank * rows:(rank + 1) * rows]
        for key in ("query_labels", "guide_queries", "positive_ids"):
            if key in kw:
                kw[key] = kw[key][rank * b:(rank + 1) * b]
        loss = hnsample.info_nce(q, c, gather=True, **kw)
        gq, gc = torch.autograd.grad(loss, (q, c))
        out[name] = (loss.detach(), gq, gc)
    torch.save(out, out_file)
    # Every rank is done with gloo once the barrier returns; leaving through os._exit skips torch's
    # gloo teardown at interpreter exit, which can abort a rank ("terminate called without an active
    # exception") depending on which peer exits first.
    dist.barrier()
    os._exit(0)
    """
)


def _options(b_total: int, m_total: int) -> dict[str, dict]:
    g = torch.Generator().manual_seed(7)
    # Local positive ids (into the rank's own docs), one padded row per rank.
    local_pos = torch.tensor([[0, 6], [1, -1], [2, 5], [3, -1], [-1, -1]] * WORLD)
    return {
        "plain": {},
        "symmetric": {"symmetric": True, "hcl_beta": 0.5, "false_negative_margin": 0.3, "temperature": 0.1},
        "combined": {
            "positive_ids": local_pos,
            "doc_ids": torch.randint(0, 10, (m_total,), generator=g),
            "query_labels": torch.randint(0, 4, (b_total,), generator=g),
            "doc_labels": torch.randint(0, 6, (m_total,), generator=g),
            "false_negative_margin": 0.2,
            "guide_queries": torch.randn(b_total, 3, generator=g),
            "guide_docs": torch.randn(m_total, 3, generator=g),
            "guide_margin": 0.3,
            "hcl_beta": 0.5,
            "tau_plus": 0.05,
            "hardness_alpha": 0.5,
            "positive_margin": 0.1,
            "temperature": 0.1,
        },
    }


def _global_positive_ids(local: torch.Tensor) -> torch.Tensor:
    rank = torch.arange(local.shape[0]) // B_LOCAL
    return torch.where(local >= 0, local + (rank * M_LOCAL).unsqueeze(1), local)


def test_gather_matches_concatenated_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    b_total, m_total = WORLD * B_LOCAL, WORLD * M_LOCAL
    queries = torch.nn.functional.normalize(torch.randn(b_total, D, generator=g), dim=1)
    docs = torch.nn.functional.normalize(torch.randn(m_total, D, generator=g), dim=1)
    options = _options(b_total, m_total)
    data_file = tmp_path / "data.pt"
    torch.save(
        {"queries": queries, "docs": docs, "options": options, "b_local": B_LOCAL, "m_local": M_LOCAL},
        data_file,
    )
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(r),
                str(WORLD),
                str(tmp_path / "init"),
                str(data_file),
                str(tmp_path / f"out{r}.pt"),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(WORLD)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()
    results = [torch.load(tmp_path / f"out{r}.pt") for r in range(WORLD)]

    # Default positives: local query i <-> local doc i, i.e. global doc rank * M_LOCAL + i.
    default_pos = _global_positive_ids(torch.arange(b_total).remainder(B_LOCAL).unsqueeze(1))
    for name, kw in options.items():
        kw = dict(kw)
        kw["positive_ids"] = _global_positive_ids(kw["positive_ids"]) if "positive_ids" in kw else default_pos
        q, c = queries.clone().requires_grad_(), docs.clone().requires_grad_()
        rows = hnsample.info_nce(q, c, reduction="none", **kw)
        # Each rank averages over its own rows with positives; DDP then averages over ranks.
        has_pos = (kw["positive_ids"] >= 0).any(dim=1)
        per_rank = [
            rows[r * B_LOCAL : (r + 1) * B_LOCAL].sum() / has_pos[r * B_LOCAL : (r + 1) * B_LOCAL].sum()
            for r in range(WORLD)
        ]
        total = torch.stack(per_rank).mean()
        gq, gc = torch.autograd.grad(total, (q, c))
        for r in range(WORLD):
            loss_r, gq_r, gc_r = results[r][name]
            torch.testing.assert_close(loss_r, per_rank[r].detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                gq_r / WORLD, gq[r * B_LOCAL : (r + 1) * B_LOCAL], atol=1e-5, rtol=1e-4
            )
            torch.testing.assert_close(
                gc_r / WORLD, gc[r * M_LOCAL : (r + 1) * M_LOCAL], atol=1e-5, rtol=1e-4
            )


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_gather_needs_a_process_group():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match="initialized torch.distributed"):
        hnsample.info_nce(q, q, gather=True)
