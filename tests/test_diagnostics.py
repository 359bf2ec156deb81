"""Collapse diagnostics on embeddings and distributions built so that the right answer is known.

- Embedding spread (SimSiam, Chen & He 2021, Sec. 4.1): ~0 when collapsed, ~1/sqrt(d) when isotropic.
- RankMe (Garrido et al. 2023, arXiv 2210.02885), checked against an independent numpy implementation of
  ``p_k = sigma_k / ||sigma||_1 + eps``, ``RankMe = exp(-sum_k p_k log p_k)``.
- DINO's two collapse modes (Caron et al. 2021, Sec. 5.3): teacher entropy at ln K (uniform) or 0 (one
  dimension) with a vanishing teacher-student KL.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sslbench.base.collapse_criteria import COLLAPSE_ENTROPY_EDGE, COLLAPSE_KL, COLLAPSE_STD_RATIO
from sslbench.evaluation.diagnostics import (
    collapse_verdict,
    effective_rank,
    embedding_diagnostics,
    embedding_std,
    entropy,
    kl_divergence,
)

K = 64  # DINO output dimension used for the verdict records


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rankme_reference(x: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe from the paper's formula, in float64 numpy."""
    sigma = np.linalg.svd(x.double().numpy(), compute_uv=False)
    p = sigma / np.abs(sigma).sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def _with_spectrum(singular_values: list[float], n: int, d: int, seed: int) -> torch.Tensor:
    """An (n, d) matrix U diag(s) V^T with orthonormal U, V: its singular values are exactly ``s``."""
    gen = _gen(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


# --- embedding spread and effective rank ------------------------------------------------------------------


def test_collapsed_embeddings_have_no_spread_and_rank_one() -> None:
    gen = _gen(0)
    point = torch.randn(1, 32, generator=gen)
    embeddings = point.repeat(256, 1) + 1e-6 * torch.randn(256, 32, generator=gen)
    std, healthy = embedding_std(embeddings)
    assert healthy == pytest.approx(1 / math.sqrt(32))
    assert std < 1e-4
    assert effective_rank(embeddings) == pytest.approx(1.0, abs=0.01)

    verdict = collapse_verdict(embedding_diagnostics(embeddings))
    assert verdict["collapsed"] is True
    assert len(verdict["reasons"]) == 1 and "collapsed" in verdict["reasons"][0]
    assert f"threshold {COLLAPSE_STD_RATIO}" in verdict["reasons"][0]
    assert "likely fix" in verdict["advice"]
    # The diagnostics travel with the verdict, so a table can show them beside it.
    assert verdict["embedding_std"] == pytest.approx(std)
    assert verdict["effective_rank"] == pytest.approx(effective_rank(embeddings))


def test_isotropic_gaussian_embeddings_are_spread_and_full_rank() -> None:
    n, d = 4096, 64
    embeddings = torch.randn(n, d, generator=_gen(1))
    std, healthy = embedding_std(embeddings)
    assert healthy == pytest.approx(1 / math.sqrt(d))
    assert std == pytest.approx(1 / math.sqrt(d), rel=0.05)
    rank = effective_rank(embeddings)
    assert 0.8 * d < rank <= d
    assert rank == pytest.approx(_rankme_reference(embeddings), rel=1e-4)

    diagnostics = embedding_diagnostics(embeddings)
    assert diagnostics == {
        "embedding_std": pytest.approx(std),
        "embedding_std_healthy": pytest.approx(healthy),
        "effective_rank": pytest.approx(rank),
    }
    verdict = collapse_verdict(diagnostics)
    assert verdict == {"collapsed": False, "reasons": [], **diagnostics}
    assert "advice" not in verdict


def test_embedding_std_is_a_mean_of_per_dimension_stds_after_normalisation() -> None:
    embeddings = torch.randn(100, 8, generator=_gen(2)) * 5.0 + 3.0
    normalised = embeddings / embeddings.norm(dim=1, keepdim=True)
    expected = normalised.std(dim=0).mean()
    assert embedding_std(embeddings)[0] == pytest.approx(float(expected), rel=1e-5)
    # Scale does not matter: the embeddings are L2-normalised first.
    assert embedding_std(embeddings * 1000)[0] == pytest.approx(embedding_std(embeddings)[0], rel=1e-5)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_effective_rank_of_a_k_dimensional_subspace(k: int) -> None:
    gen = _gen(10 + k)
    embeddings = torch.randn(512, k, generator=gen) @ torch.randn(k, 48, generator=gen)
    rank = effective_rank(embeddings)
    assert rank <= k + 0.01
    assert rank > 0.5 * k
    assert rank == pytest.approx(_rankme_reference(embeddings), rel=1e-4)


def test_effective_rank_matches_the_formula_on_a_known_spectrum() -> None:
    # sigma = (4, 2, 1, 1): p = (1/2, 1/4, 1/8, 1/8), H = 1.75 ln 2, so RankMe = 2 ** 1.75.
    x = _with_spectrum([4.0, 2.0, 1.0, 1.0], n=50, d=4, seed=3)
    assert _rankme_reference(x) == pytest.approx(2**1.75, rel=1e-5)
    assert effective_rank(x.float()) == pytest.approx(2**1.75, rel=1e-4)
    # Equal singular values: the rank is their count; the scale of the embeddings does not matter.
    flat = _with_spectrum([3.0] * 5, n=40, d=5, seed=4).float()
    assert effective_rank(flat) == pytest.approx(5.0, rel=1e-4)
    assert effective_rank(flat * 1e3) == pytest.approx(5.0, rel=1e-4)


def test_effective_rank_reads_feature_maps_as_flattened_vectors() -> None:
    maps = torch.randn(64, 2, 2, 2, generator=_gen(5))
    assert effective_rank(maps) == pytest.approx(effective_rank(maps.flatten(1)))
    assert effective_rank(maps) == pytest.approx(_rankme_reference(maps.flatten(1)), rel=1e-4)


# --- entropy and KL ------------------------------------------------------------------------------------


def test_entropy_of_uniform_and_one_hot_rows() -> None:
    for k in (2, 10, 4096):
        uniform = torch.full((3, k), 1.0 / k)
        assert float(entropy(uniform)) == pytest.approx(math.log(k), rel=1e-5)
    one_hot = torch.eye(7)[[0, 3, 6]]
    assert float(entropy(one_hot)) == 0.0
    # A mean over rows: one uniform row over 4 and one one-hot row give ln(4) / 2.
    mixed = torch.stack([torch.full((4,), 0.25), torch.tensor([0.0, 1.0, 0.0, 0.0])])
    assert float(entropy(mixed)) == pytest.approx(math.log(4) / 2, rel=1e-6)


def test_kl_divergence_against_a_hand_computation() -> None:
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.9, 0.1], [0.25, 0.75]], dtype=torch.float64)
    # Row 1: 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = ln(5/3); row 2: 1 ln(1/0.25) = ln 4; 0 log 0 = 0.
    expected = (math.log(5 / 3) + math.log(4)) / 2
    assert float(kl_divergence(p, q)) == pytest.approx(expected, rel=1e-9)
    assert float(kl_divergence(p, p)) == 0.0
    random = torch.softmax(torch.randn(16, 32, generator=_gen(6)), dim=-1)
    assert float(kl_divergence(random, random)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_divergence(random, torch.full_like(random, 1 / 32))) > 0.0


# --- the DINO collapse verdict ---------------------------------------------------------------------------


def _dino_record(entropy_value: float, kl: float) -> dict[str, float]:
    return {
        "embedding_std": 0.1,
        "embedding_std_healthy": 0.125,  # a healthy spread: only the DINO rule can flag these records
        "teacher_entropy": entropy_value,
        "teacher_student_kl": kl,
    }


def test_uniform_collapse_is_flagged() -> None:
    verdict = collapse_verdict(_dino_record(0.999 * math.log(K), 1e-5), num_outputs=K)
    assert verdict["collapsed"] is True
    assert len(verdict["reasons"]) == 1 and verdict["reasons"][0].startswith("uniform collapse")
    assert "advice" in verdict
    assert verdict["teacher_entropy"] == pytest.approx(0.999 * math.log(K))
    assert verdict["teacher_student_kl"] == 1e-5


def test_one_dimension_collapse_is_flagged() -> None:
    verdict = collapse_verdict(_dino_record(1e-3, 1e-6), num_outputs=K)
    assert verdict["collapsed"] is True
    assert len(verdict["reasons"]) == 1 and verdict["reasons"][0].startswith("one-dimension collapse")
    assert "advice" in verdict


def test_healthy_entropy_with_small_kl_is_not_flagged() -> None:
    verdict = collapse_verdict(_dino_record(0.5 * math.log(K), 1e-6), num_outputs=K)
    assert verdict["collapsed"] is False and verdict["reasons"] == []
    assert "advice" not in verdict


def test_extreme_entropy_with_a_large_kl_is_not_flagged() -> None:
    for entropy_value in (math.log(K), 0.0):
        verdict = collapse_verdict(_dino_record(entropy_value, 10 * COLLAPSE_KL), num_outputs=K)
        assert verdict["collapsed"] is False, entropy_value


def test_the_dino_rule_is_skipped_without_num_outputs() -> None:
    for entropy_value in (math.log(K), 0.0):
        assert collapse_verdict(_dino_record(entropy_value, 1e-6))["collapsed"] is False
        assert collapse_verdict(_dino_record(entropy_value, 1e-6), num_outputs=None)["collapsed"] is False


def test_thresholds_are_the_documented_constants() -> None:
    log_k = math.log(K)
    below_kl = 0.5 * COLLAPSE_KL
    upper = (1 - COLLAPSE_ENTROPY_EDGE) * log_k
    lower = COLLAPSE_ENTROPY_EDGE * log_k
    flagged = {
        upper * 1.001: True,  # just inside the uniform edge
        upper * 0.999: False,
        lower * 0.999: True,  # just inside the one-dimension edge
        lower * 1.001: False,
    }
    for entropy_value, expected in flagged.items():
        verdict = collapse_verdict(_dino_record(entropy_value, below_kl), num_outputs=K)
        assert verdict["collapsed"] is expected, entropy_value
    # The KL threshold is strict.
    assert collapse_verdict(_dino_record(log_k, COLLAPSE_KL), num_outputs=K)["collapsed"] is False
    # The spread threshold: a ratio just under COLLAPSE_STD_RATIO is a collapse, just over it is not.
    healthy = 0.125
    for ratio, expected in ((COLLAPSE_STD_RATIO * 0.99, True), (COLLAPSE_STD_RATIO * 1.01, False)):
        record = {"embedding_std": ratio * healthy, "embedding_std_healthy": healthy}
        assert collapse_verdict(record)["collapsed"] is expected, ratio


def test_both_rules_report_together() -> None:
    record = _dino_record(math.log(K), 1e-6) | {"embedding_std": 0.001}
    verdict = collapse_verdict(record, num_outputs=K)
    assert verdict["collapsed"] is True
    prefixes = [reason.split(":")[0] for reason in verdict["reasons"]]
    assert prefixes == ["embeddings collapsed", "uniform collapse"]


def test_dino_entropy_plus_kl_is_its_cross_entropy_loss() -> None:
    """DINO Sec. 5.3 splits the loss as H(P_t, P_s) = h(P_t) + KL(P_t || P_s) over the loss's own pairs."""
    from sslbench import Step, TrainContext, create_backbone, get_method

    torch.manual_seed(0)
    dino = get_method("dino")
    config = dino.Config(out_dim=64, hidden_dim=64, bottleneck_dim=32, local_crops_number=2)
    method = dino(create_backbone("resnet18", 32), config, TrainContext(1, 2, 10, 32)).eval()
    views = [
        torch.randn(4, 3, 32, 32),
        torch.randn(4, 3, 32, 32),
        torch.randn(4, 3, 16, 16),
        torch.randn(4, 3, 16, 16),
    ]
    output = method.training_step(views, torch.zeros(4, dtype=torch.long), Step(0, 0, 2, 2, diagnose=True))
    split = output.logs["teacher_entropy"] + output.logs["teacher_student_kl"]
    torch.testing.assert_close(split, output.loss.detach(), rtol=1e-5, atol=1e-5)
