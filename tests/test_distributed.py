"""Distributed training: 2 ranks (gloo, CPU) take the same steps as 1 process with the same global batch.

The end-to-end check launches ``torchrun --nproc_per_node=2 -m sslbench run`` and ``python -m sslbench
run`` with one config and compares the saved weights, the logged losses and the k-NN numbers. It
covers the pieces that make the ranks one batch: the sampler, per-sample augmentation seeds, DDP's
gradient averaging, DINO's all-reduced center, SimCLR's negatives gathered with gradients, and
BatchNorm statistics across ranks (BYOL's per-view BN included), MoCo v2's queue of every rank's keys,
MoCo v3's gathered keys, SwAV's Sinkhorn over the global batch, Barlow Twins' all-reduced
cross-correlation and VICReg's gathered statistics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sslbench.base.collectives import gather_with_grad, on_main
from sslbench.base.errors import SSLBenchError
from sslbench.data.datasets import ArraySource
from sslbench.data.sampling import EpochSampler, SeededViews, sample_seed
from sslbench.models.backbones import create_backbone
from sslbench.training.distributed import CrossRankBatchNorm, _local_gpu, sync_batch_norm
from sslbench.training.runner import seed_everything

# Every built-in method with an operation over the batch (or masks drawn for it), on the backbone it trains.
BATCH_METHODS = ["dino", "simclr", "byol", "mocov2", "mocov3", "swav", "barlow_twins", "vicreg"]
VIT_METHODS = ["ibot", "dinov2", "mae"]  # ViTs only: their own run, without stochastic depth
PAIRS = [f"{m}-resnet18" for m in BATCH_METHODS] + [f"{m}-vit_tiny16" for m in VIT_METHODS]
# Barlow Twins' and VICReg's losses sum over dimensions: plain SGD at this lr makes their training
# unstable (the loss rises), which amplifies rounding differences to 6e-3 and 9e-4 of the distance moved
# (the others: 3e-7 to 8e-5). Their gradients on 2 ranks equal one process's to 1e-6 in the losses' own
# tests (tests/test_losses_redundancy_reduction.py); the bugs this test guards against move weights 8e-2
# of the way or more.
TOLERANCE = {"barlow_twins": 2e-2, "vicreg": 5e-3}
RUN_ARGS = [
    "run",
    f"--methods={','.join(BATCH_METHODS)}",
    "--arch=resnet18",
    "--epochs=1",
    "--batch-size=8",
    "--device=cpu",
    "--no-progress",
    "--set=train.train_per_class=3",  # 30 images: 3 steps of 8
    "--set=train.log_every=1",
    "--set=train.precision=fp32",  # bf16 rounds differently at each batch split; this compares to 1e-5
    # Weights that move: plain SGD (AdamW would hide a loss scaled by the number of ranks), lr 0.1 from
    # the first step, no clipping, and teachers that follow their students closely.
    "--set=train.optimizer=sgd",
    "--set=train.lr=3.2",
    "--set=train.warmup_epochs=0",
    "--set=train.clip_grad=0",
    "--set=train.ema_momentum=0.5",
    "--set=train.ema_momentum_end=0.5",
    "--set=eval.monitor_every=0",
    "--set=eval.linear=false",
    "--set=eval.train_per_class=10",
    "--set=eval.test_per_class=5",
    "--set=dino.out_dim=64",
    "--set=dino.hidden_dim=64",
    "--set=dino.local_crops_number=2",
    "--set=byol.proj_hidden_dim=64",
    "--set=byol.pred_hidden_dim=64",
    "--set=mocov2.queue_size=32",
    "--set=mocov3.proj_hidden_dim=64",
    "--set=mocov3.pred_hidden_dim=64",
    "--set=swav.num_prototypes=16",
    "--set=swav.local_crops_number=2",
    "--set=barlow_twins.proj_hidden_dim=64",
    "--set=barlow_twins.proj_dim=8",  # its loss sums over the dimensions: see TOLERANCE
    "--set=vicreg.proj_hidden_dim=64",
    "--set=vicreg.proj_dim=64",
    "--set=vicreg.sim_coeff=1.0",  # the paper's 25 / 25 / 1, all divided by 25, for the same reason
    "--set=vicreg.std_coeff=1.0",
    "--set=vicreg.cov_coeff=0.04",
]


VIT_ARGS = [
    *[arg for arg in RUN_ARGS if not arg.startswith(("--methods=", "--arch="))],
    f"--methods={','.join(VIT_METHODS)}",
    "--arch=vit_tiny16",
    "--set=train.drop_path_rate=0",  # drawn per sample from the global generator: not split by rank
    *[f"--set={m}.{k}=64" for m in ("ibot", "dinov2") for k in ("out_dim", "hidden_dim")],
    "--set=ibot.local_crops_number=1",
    "--set=dinov2.local_crops_number=1",
    "--set=dinov2.koleo_weight=0",  # KoLeo is per rank (nearest neighbours in its own batch), as DINOv2's
    "--set=mae.decoder_dim=32",
    "--set=mae.decoder_depth=1",
]


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The ResNet pairs and the ViT pairs, each run by 1 process and by 2 ranks (group/one, group/two)."""
    root = tmp_path_factory.mktemp("distributed")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for args, group in ((RUN_ARGS, "resnet"), (VIT_ARGS, "vit")):
        single = [sys.executable, "-m", "sslbench", *args, f"--out={root / group / 'one'}"]
        double = [*launcher, "-m", "sslbench", *args, f"--out={root / group / 'two'}"]
        for command in (single, double):
            done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=400)
            assert done.returncode == 0, done.stderr[-3000:]
    return root


def _folders(root: Path, pair: str) -> tuple[Path, Path]:
    """The pair's folder in the 1-process run and in the 2-rank run."""
    group = root / ("vit" if pair.endswith("vit_tiny16") else "resnet")
    return group / "one" / pair, group / "two" / pair


def _initial_weights(arch: str) -> dict[str, torch.Tensor]:
    """The backbone every pair starts from: the runner seeds with the config's seed, then builds it."""
    seed_everything(0)
    return create_backbone(arch, 32).state_dict()


def test_two_ranks_match_one_process(runs):
    """The evaluated network (DINO's and BYOL's teacher, SimCLR's encoder, ...) of 2 ranks x 4 images
    equals that of 1 process x 8 to a thousandth of how far training moved it; a loss scaled by the
    number of ranks, negatives gathered without their gradient or rank-local updates move it far more.
    The ViT-only methods' masks are drawn for the global batch and cut by rank, so they match too."""
    for pair in PAIRS:
        one, two = _folders(runs, pair)
        start = _initial_weights(pair.split("-")[1])
        single = torch.load(one / "backbone.pt", weights_only=True)
        double = torch.load(two / "backbone.pt", weights_only=True)
        assert single.keys() == double.keys() == start.keys()
        floats = [key for key, value in single.items() if value.is_floating_point() and "running_" not in key]
        moved = torch.cat([(single[k] - start[k]).flatten() for k in floats]).norm()
        apart = torch.cat([(double[k] - single[k]).flatten() for k in floats]).norm()
        assert moved > 0.1, f"{pair}: training barely moved the weights ({moved:.3g})"
        tolerance = TOLERANCE.get(pair.split("-")[0], 1e-3)
        assert apart < tolerance * moved, f"{pair}: 2 ranks ended {apart / moved:.2e} of the way apart"
        losses = [
            [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (one, two)
        ]
        assert len(losses[0]) == 3
        assert losses[1] == pytest.approx(losses[0], rel=TOLERANCE.get(pair.split("-")[0], 1e-4))
        evals = [json.loads((run / "eval.json").read_text()) for run in (one, two)]
        assert (evals[0]["protocol"]["processes"], evals[1]["protocol"]["processes"]) == (1, 2)


def test_only_the_main_rank_writes(runs):
    for group in ("resnet", "vit"):
        two = runs / group / "two"
        pairs = [pair for pair in PAIRS if _folders(runs, pair)[1].parent == two]
        assert sorted(p.name for p in two.iterdir() if p.is_dir()) == sorted(pairs)
        assert (two / "table.md").exists() and (two / "summary.csv").exists()


# --- the pieces, in one process ---------------------------------------------------------------------


def test_rank_rows_are_the_rows_of_this_ranks_images(monkeypatch):
    """A draw for the global batch (masks), cut as the sampler deals images: rank r has r, r + W, ..."""
    from sslbench.base import collectives

    drawn = torch.arange(12).view(2, 6)  # 2 crops x a global batch of 6
    assert collectives.rank_rows(drawn, dim=1) is drawn  # one process keeps the whole draw
    monkeypatch.setattr(collectives, "is_distributed", lambda: True)
    monkeypatch.setattr(collectives, "world_size", lambda: 3)
    monkeypatch.setattr(collectives, "rank", lambda: 1)
    assert collectives.rank_rows(drawn, dim=1).tolist() == [[1, 4], [7, 10]]
    whole = list(EpochSampler(12, seed=3, batch_per_rank=6))
    share = list(EpochSampler(12, 3, 2, rank=1, world=3))
    assert [i for _, i in share[:2]] == [i for _, i in whole[:6]][1::3]


def test_epoch_sampler_deals_each_global_batch_to_the_ranks():
    size, batch, world = 50, 4, 3
    whole = list(EpochSampler(size, seed=7, batch_per_rank=batch * world))
    shares = [list(EpochSampler(size, 7, batch, rank, world)) for rank in range(world)]
    assert len(whole) == 48 and all(len(share) == 16 for share in shares)
    for k in range(len(whole) // (batch * world)):
        union = {index for share in shares for _, index in share[k * batch : (k + 1) * batch]}
        assert union == {index for _, index in whole[k * batch * world : (k + 1) * batch * world]}


def test_epoch_sampler_reshuffles_per_epoch_and_repeats_per_seed():
    sampler = EpochSampler(20, seed=1, batch_per_rank=5)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert {e for e, _ in first} == {0} and {e for e, _ in second} == {1}
    assert [i for _, i in first] != [i for _, i in second]
    assert list(EpochSampler(20, seed=1, batch_per_rank=5)) == first


def test_seeded_views_depend_on_seed_epoch_and_index_only():
    images = torch.randint(0, 255, (4, 8, 8, 3), dtype=torch.uint8).numpy()
    source = ArraySource(images, [0, 1, 2, 3])
    dataset = SeededViews(source, lambda image: torch.rand(3), seed=5)
    before = torch.random.get_rng_state()
    a = dataset[(0, 2)][0]
    assert torch.equal(torch.random.get_rng_state(), before)  # training's own generator is untouched
    torch.manual_seed(123)  # whatever the global state, the same (epoch, index) gives the same views
    assert torch.equal(dataset[(0, 2)][0], a)
    assert not torch.equal(dataset[(1, 2)][0], a) and not torch.equal(dataset[(0, 3)][0], a)
    assert sample_seed(5, 0, 2) != sample_seed(5, 2, 0)


def test_one_process_pieces_are_the_identity():
    x = torch.randn(4, 3)
    assert gather_with_grad(x) is x
    assert on_main(lambda: 42) == 42
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    assert sync_batch_norm(model, torch.device("cpu")) is model


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 4, 4)])
def test_cross_rank_batch_norm_formula_matches_batch_norm(monkeypatch, shape):
    """Its own statistics path (taken when distributed), with a one-rank all-reduce: BatchNorm's
    output, gradients and running statistics."""
    import sslbench.training.distributed as distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist_fn, "all_reduce", lambda tensor: tensor)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 1)
    reference = nn.BatchNorm2d(3) if len(shape) == 4 else nn.BatchNorm1d(3)
    nn.init.uniform_(reference.weight)
    crossed = CrossRankBatchNorm(3)
    crossed.load_state_dict(reference.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    y_ref = reference(x)
    (grad_ref,) = torch.autograd.grad(y_ref.pow(2).sum(), x)
    y = crossed(x)
    (grad,) = torch.autograd.grad(y.pow(2).sum(), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(crossed.running_mean, reference.running_mean)
    torch.testing.assert_close(crossed.running_var, reference.running_var)


def test_cross_rank_batch_norm_keeps_fp32_statistics_under_bf16(monkeypatch):
    """A bf16 activation (a convolution under autocast) is normalised with fp32 statistics and comes
    back in bf16, as BatchNorm does; the running statistics stay fp32."""
    import sslbench.training.distributed as distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist_fn, "all_reduce", lambda tensor: tensor)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 1)
    reference, crossed = nn.BatchNorm2d(3), CrossRankBatchNorm(3)
    x = (torch.randn(6, 3, 4, 4) * 3 + 5).bfloat16()
    y = crossed(x)
    assert y.dtype == torch.bfloat16 and crossed.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), reference(x.float()), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(crossed.running_var, reference.running_var)


def test_each_process_takes_its_own_gpu_whether_it_sees_the_nodes_or_only_its_own():
    assert [_local_gpu(rank, 8) for rank in range(8)] == list(range(8))  # torchrun, or Slurm's default
    assert _local_gpu(5, 1) == 0  # a scheduler that binds one GPU to each task
    with pytest.raises(SSLBenchError, match="process 8 of this node sees 8 GPU"):
        _local_gpu(8, 8)  # more processes than GPUs: refused, not two ranks sharing one GPU
