"""Losses as pure functions (``hirl_ray.losses``): each equals a literal loop over its equation.

The semantic path loss has its own file (``tests/test_path_loss.py``, against the slow
reference in ``tests/path_loss_reference.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hirl_ray.losses import byol_loss, info_nce_loss, negative_cosine_loss, nt_xent_loss


def test_nt_xent_matches_a_literal_loop() -> None:
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    terms = []
    for i in range(10):
        j = (i + 5) % 10
        sims = [torch.exp(z[i] @ z[k] / 0.3) for k in range(10) if k != i]
        terms.append(-torch.log(torch.exp(z[i] @ z[j] / 0.3) / sum(sims)))
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.3), torch.stack(terms).mean())


def test_nt_xent_with_gathered_negatives_averages_to_the_global_batch_loss() -> None:
    # Two "ranks" of 3 anchors each, contrasted with all 12 projections: the mean of their
    # losses is the one-worker loss of the 6-sample batch (SimCLR's global negatives).
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    per_rank = [nt_xent_loss(z1[r * 3:(r + 1) * 3], z2[r * 3:(r + 1) * 3], 0.2, z1, z2,
                             offset=r * 3) for r in range(2)]
    torch.testing.assert_close(sum(per_rank) / 2, nt_xent_loss(z1, z2, 0.2))
    assert not torch.allclose(per_rank[0], nt_xent_loss(z1[:3], z2[:3], 0.2))  # more negatives


def test_info_nce_matches_a_literal_loop() -> None:
    q, k = F.normalize(torch.randn(4, 6), dim=1), F.normalize(torch.randn(4, 6), dim=1)
    queue = F.normalize(torch.randn(9, 6), dim=1)
    terms = []
    for i in range(4):
        pos = torch.exp(q[i] @ k[i] / 0.2)
        terms.append(-torch.log(pos / (pos + sum(torch.exp(q[i] @ n / 0.2) for n in queue))))
    torch.testing.assert_close(info_nce_loss(q, k, queue, 0.2), torch.stack(terms).mean())


def test_regression_losses_values_and_stop_gradient() -> None:
    p = torch.randn(6, 5)
    torch.testing.assert_close(byol_loss(p, 3 * p), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(byol_loss(p, -p), torch.tensor(4.0))
    torch.testing.assert_close(negative_cosine_loss(p, 2 * p), torch.tensor(-1.0))
    z = torch.randn(6, 5)
    expected = (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()
    torch.testing.assert_close(byol_loss(p, z), expected)
    torch.testing.assert_close(negative_cosine_loss(p, z), (expected - 2) / 2)
    p, z = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    (byol_loss(p, z) + negative_cosine_loss(p, z)).backward()
    assert z.grad is None and p.grad is not None  # stop-gradient on the target branch


def test_losses_run_in_float32_under_half_inputs() -> None:
    q = F.normalize(torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(5, 8), dim=1)
    for loss in (nt_xent_loss(q.half(), q.flip(0).half(), 0.2),
                 info_nce_loss(q.half(), q.half(), queue.half(), 0.2),
                 byol_loss(q.half(), q.half()), negative_cosine_loss(q.half(), q.half())):
        assert loss.dtype == torch.float32
