"""DINO, iBOT, KoLeo, centering, Sinkhorn-Knopp and MAE against values worked out by hand or in numpy."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fmct.models import ViT3DConfig, build_vit3d
from fmct.models.vit3d import PatchEmbed3D
from fmct.ssl import (
    DINOLoss,
    EMACenter,
    KoLeoLoss,
    MAEDecoder,
    iBOTPatchLoss,
    mae_loss,
    patchify3d,
    random_masking,
    sinkhorn_knopp,
    unpatchify3d,
)

torch.set_num_threads(1)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------------------------------ DINO
def test_dino_loss_docstring_example():
    teacher = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    student = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])
    loss = DINOLoss(out_dim=2, student_temp=1.0)(student, teacher)
    assert loss.item() == pytest.approx((-math.log(0.75) + math.log(2.0)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.4904, abs=1e-4)


def test_dino_loss_matches_pairwise_numpy_loop():
    rng = np.random.default_rng(0)
    n_global, n_local, batch, k = 2, 2, 2, 4
    student = rng.normal(size=(n_global + n_local, batch, k))
    teacher = rng.dirichlet(np.ones(k), size=(n_global, batch))
    total, pairs = 0.0, 0
    for t in range(n_global):
        for s in range(n_global + n_local):
            if s == t:
                continue
            log_q = np_log_softmax(student[s] / 0.1)
            total += np.mean(-(teacher[t] * log_q).sum(axis=-1))
            pairs += 1
    assert pairs == 6
    loss = DINOLoss(out_dim=k, student_temp=0.1)(
        torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32)
    )
    assert loss.item() == pytest.approx(total / pairs, rel=1e-5)


def test_dino_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="DINO loss"):
        DINOLoss(out_dim=4)(torch.zeros(1, 2, 4), torch.zeros(2, 2, 4))


# ------------------------------------------------------------------------------------------ iBOT
def test_ibot_loss_docstring_example():
    # Student logits chosen so that each token's cross-entropy with teacher [1, 0] is exactly 0.2 or 0.4.
    student = torch.tensor([[0.0, math.log(math.exp(0.2) - 1)], [0.0, math.log(math.exp(0.4) - 1)]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    masks = torch.tensor([[True, True, False], [False, False, False]])
    loss = iBOTPatchLoss(out_dim=2, student_temp=1.0)(student, teacher, masks)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)


def test_ibot_loss_matches_per_image_numpy_average():
    rng = np.random.default_rng(1)
    masks = np.array([[1, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    n_masked, k = masks.sum(), 4
    student = rng.normal(size=(n_masked, k))
    teacher = rng.dirichlet(np.ones(k), size=n_masked)
    token_ce = -(teacher * np_log_softmax(student / 0.1)).sum(axis=-1)
    image_of_token = np.nonzero(masks)[0]
    per_image = [token_ce[image_of_token == b].mean() if masks[b].any() else 0.0 for b in range(3)]
    expected = sum(per_image) / 3
    loss = iBOTPatchLoss(out_dim=k)(
        torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32), torch.tensor(masks)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="iBOT loss"):
        iBOTPatchLoss(out_dim=k)(torch.zeros(3, k), torch.zeros(3, k), torch.tensor(masks))


def test_losses_compute_in_fp32_under_bf16_autocast():
    torch.manual_seed(7)
    student = torch.randn(4, 3, 512).bfloat16()  # bf16 head outputs, as autocast produces them
    teacher = torch.softmax(torch.randn(2, 3, 512), dim=-1)
    masks = torch.tensor([[True, False], [True, True]])
    features = torch.randn(6, 32).bfloat16()
    reference = (
        DINOLoss(512)(student, teacher),
        iBOTPatchLoss(512)(student[0], teacher.reshape(6, 512)[:3], masks),
        KoLeoLoss()(features),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = (
            DINOLoss(512)(student, teacher),
            iBOTPatchLoss(512)(student[0], teacher.reshape(6, 512)[:3], masks),
            KoLeoLoss()(features),
        )
    for expected, got in zip(reference, under_autocast):
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------- KoLeo
def test_koleo_on_square_and_against_brute_force():
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3.0  # scale is normalised away
    assert KoLeoLoss()(square).item() == pytest.approx(-math.log(math.sqrt(2.0)), abs=1e-6)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    distances = np.linalg.norm(x[:, None] - x[None], axis=-1) + np.diag(np.full(6, np.inf))
    expected = -np.log(distances.min(axis=1)).mean()
    assert KoLeoLoss()(torch.tensor(x, dtype=torch.float32)).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_with_duplicate_rows_is_finite_in_value_and_gradient():
    features = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    loss = KoLeoLoss(eps=1e-8)(features)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
    # Rows 0 and 1 coincide: -log(eps) = 18.42 each. Row 2's nearest row is row 0 at distance
    # |(-2, 0, 2)| / sqrt(14) = 0.756. The zero row stays zero, at distance 1 from every unit row.
    expected = (2 * -math.log(1e-8) - math.log(math.sqrt(8 / 14)) - math.log(1.0)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------- centering
def test_ema_center_docstring_example():
    center = EMACenter(dim=2, momentum=0.9)
    probs = center(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), teacher_temp=1.0)
    assert torch.allclose(probs[0], torch.softmax(torch.tensor([1.0, 0.0]), -1))  # centre was still 0
    assert torch.allclose(center.center, torch.tensor([[0.2, 0.0]]))
    after = center.softmax_centered(torch.tensor([[1.0, 0.0]]), teacher_temp=1.0)
    assert torch.allclose(after, torch.tensor([[0.6900, 0.3100]]), atol=1e-4)
    assert "center" in center.state_dict()


def numpy_sinkhorn(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    q = np.exp(logits / temp).T  # prototypes x samples, as in SwAV's description
    k, m = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * m
    return (q * m).T


def test_sinkhorn_marginals_and_numpy_reference():
    rng = np.random.default_rng(3)
    logits = rng.uniform(-1, 1, size=(12, 4))
    logits[:, 0] += 0.5  # prototype 0 favoured by every sample
    torch_logits = torch.tensor(logits, dtype=torch.float32)
    q = sinkhorn_knopp(torch_logits, teacher_temp=0.1, n_iterations=3)
    assert torch.allclose(q.double(), torch.tensor(numpy_sinkhorn(logits, 0.1, 3)), atol=1e-5)
    assert torch.allclose(q.sum(dim=1), torch.ones(12), atol=1e-5)
    # Prototype usage: softmax puts most mass on prototype 0; Sinkhorn moves it towards 12 / 4 = 3 each.
    softmax_usage = torch.softmax(torch_logits / 0.1, dim=1).sum(dim=0)
    usage = q.sum(dim=0)
    assert (usage - 3).abs().max() < (softmax_usage - 3).abs().max()
    converged = sinkhorn_knopp(torch_logits, teacher_temp=0.1, n_iterations=200)
    assert torch.allclose(converged.sum(dim=0), torch.full((4,), 3.0), atol=1e-3)
    assert torch.allclose(converged.sum(dim=1), torch.ones(12), atol=1e-5)
    # Large logits do not overflow: the global max is subtracted first.
    assert torch.isfinite(sinkhorn_knopp(torch_logits * 100, teacher_temp=0.04)).all()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank: int, port: int, logits: torch.Tensor, splits: list[list[int]], results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for i, rows in enumerate(splits):
            local = logits[sum(rows[:rank]) : sum(rows[: rank + 1])]
            q = sinkhorn_knopp(local, teacher_temp=0.1, n_iterations=3)
            center = EMACenter(dim=logits.shape[1], momentum=0.5)
            center.update(local)
            results[rank, i] = (q, center.center.clone())
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_center_across_two_ranks_with_unequal_rows():
    """10 rows split 7 + 3 or 10 + 0 over two ranks (masked tokens) give the result of one process."""
    torch.manual_seed(4)
    logits = torch.rand(10, 5) * 2 - 1
    splits = [[7, 3], [10, 0]]
    results = mp.Manager().dict()
    mp.start_processes(
        _distributed_worker, args=(_free_port(), logits, splits, results), nprocs=2, start_method="spawn"
    )
    single_q = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=3)
    single_center = EMACenter(dim=5, momentum=0.5)
    single_center.update(logits)
    for i, rows in enumerate(splits):
        assert results[1, i][0].shape == (rows[1], 5)
        assert torch.allclose(torch.cat([results[0, i][0], results[1, i][0]]), single_q, atol=1e-6)
        assert torch.allclose(results[0, i][1], single_center.center, atol=1e-6)
        assert torch.allclose(results[1, i][1], single_center.center, atol=1e-6)


# ------------------------------------------------------------------------------------------- MAE
def test_patchify_matches_volume_blocks_and_vit_patch_order():
    volume = torch.randn(2, 3, 16, 8, 12)
    patches = patchify3d(volume, (8, 4, 4))
    assert patches.shape == (2, 2 * 2 * 3, 3 * 8 * 4 * 4)
    # Patch (d, h, w) = (1, 0, 2) is number 1*6 + 0*3 + 2 = 8.
    assert torch.equal(patches[:, 8], volume[:, :, 8:16, 0:4, 8:12].reshape(2, -1))
    assert torch.equal(unpatchify3d(patches, (2, 2, 3), (8, 4, 4), channels=3), volume)
    # The ViT's patch embedding with an identity kernel yields the same vectors in the same order.
    embed = PatchEmbed3D((8, 4, 4), in_chans=3, embed_dim=3 * 8 * 4 * 4)
    with torch.no_grad():
        embed.proj.weight.copy_(torch.eye(3 * 8 * 4 * 4).reshape(-1, 3, 8, 4, 4))
        embed.proj.bias.zero_()
        assert torch.allclose(embed(volume), patches, atol=1e-6)


def test_random_masking_hides_the_ratio_and_restores_order():
    generator = torch.Generator().manual_seed(5)
    split = random_masking(batch_size=3, n_patches=64, mask_ratio=0.75, generator=generator)
    assert split.keep_idx.shape == (3, 16) and split.mask.shape == (3, 64)
    assert torch.equal(split.mask.sum(dim=1), torch.tensor([48, 48, 48]))
    for b in range(3):
        assert not split.mask[b, split.keep_idx[b]].any()
    assert not torch.equal(split.mask[0], split.mask[1])  # drawn per image
    # Gathering [visible tokens, masked tokens] with restore_idx puts every patch back in its place.
    patch_ids = torch.arange(64).expand(3, -1)
    masked_ids = torch.stack([patch_ids[b][split.mask[b]] for b in range(3)])
    shuffled = torch.cat([torch.gather(patch_ids, 1, split.keep_idx), masked_ids], dim=1)
    assert set(shuffled[0].tolist()) == set(range(64))
    kept_first = torch.gather(patch_ids, 1, split.keep_idx)
    full = torch.cat([kept_first, torch.full((3, 48), -1)], dim=1)
    restored = torch.gather(full, 1, split.restore_idx)
    assert torch.equal(restored == -1, split.mask)
    assert torch.equal(restored[~split.mask], patch_ids[~split.mask])


def test_mae_loss_hand_values():
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 3.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, False]])
    assert mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(5.0)
    # norm_pix: [1, 3] -> mean 2, variance 1 -> [-1, 1]; error to 0 is (1 + 1) / 2 = 1 (up to eps).
    assert mae_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(1.0, abs=1e-5)
    assert mae_loss(torch.tensor([[[-1.0, 1.0], [9.0, 9.0]]]), target, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_mae_encoder_decoder_learns_to_reconstruct():
    torch.manual_seed(6)
    encoder = build_vit3d(
        ViT3DConfig(size="tiny", img_size=(16, 16, 16), patch_size=4, depth=1, embed_dim=48, n_heads=3)
    )
    decoder = MAEDecoder(encoder_dim=48, patch_dim=3 * 4**3, grid_size=(4, 4, 4), decoder_dim=48, depth=1, n_heads=3)
    # A smooth volume: hidden patches can be predicted from visible neighbours.
    coords = torch.linspace(0, 1, 16)
    d, h, w = torch.meshgrid(coords, coords, coords, indexing="ij")
    volume = torch.stack([d + h, h * w, torch.sin(3 * d)]).unsqueeze(0).expand(2, -1, -1, -1, -1)
    target = patchify3d(volume, 4)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=3e-3)
    losses = []
    for step in range(30):
        split = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(step))
        visible = encoder.forward_features(volume, keep_idx=split.keep_idx)["patch"]
        loss = mae_loss(decoder(visible, split.restore_idx), target, split.mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


# ------------------------------------------------------------------------------------ chunked losses
# The losses compute in float32 whatever their inputs' dtype (bf16 logits are upcast), so chunked and
# whole agree to float32 rounding of sums taken in another order: relative 1e-6. The head and the
# inputs are float64, so nothing else adds rounding.
RTOL = 1e-6


def _head_and_inputs(rows: int, in_dim: int = 16, prototypes: int = 64):
    from fmct.models import DINOHead

    torch.manual_seed(0)
    head = DINOHead(in_dim, prototypes, hidden=32, bottleneck=8).double()
    features = torch.randn(rows, in_dim, dtype=torch.float64, requires_grad=True)
    teacher = sinkhorn_knopp(torch.randn(rows, prototypes, dtype=torch.float64) * 3, 0.07)
    return head, features, teacher


def _loss_and_grads(compute_loss, head, features) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for tensor in [features, *head.parameters()]:
        tensor.grad = None
    loss = compute_loss()
    loss.backward()
    return loss.detach(), [features.grad.clone()] + [p.grad.clone() for p in head.parameters()]


def _assert_same(loss, grads, whole, whole_grads, chunk):
    assert torch.allclose(loss, whole, rtol=RTOL, atol=0), (chunk, float(loss - whole))
    for got, expected in zip(grads, whole_grads, strict=True):
        scale = float(expected.abs().max())
        assert scale > 0 and torch.allclose(got, expected, rtol=RTOL, atol=RTOL * scale), chunk


def test_chunked_ibot_loss_equals_the_whole_loss_and_gradients():
    """Through a real head: 37 masked tokens of 6 crops (two unmasked), in chunks of 1, 5 and 36 tokens."""
    masks = torch.zeros(6, 20, dtype=torch.bool)
    for crop, count in enumerate([9, 0, 3, 14, 0, 11]):
        masks[crop, torch.randperm(20, generator=torch.Generator().manual_seed(crop))[:count]] = True
    head, features, teacher = _head_and_inputs(int(masks.sum()))
    assert features.shape[0] == 37

    def loss_with(chunk_rows: int):
        return lambda: iBOTPatchLoss(64, 0.1, chunk_rows=chunk_rows)(head(features), teacher, masks)

    whole, whole_grads = _loss_and_grads(loss_with(0), head, features)
    assert whole.item() > 0
    for chunk_rows in (1, 5, 36):
        _assert_same(*_loss_and_grads(loss_with(chunk_rows), head, features), whole, whole_grads, chunk_rows)


def test_chunked_dino_loss_equals_the_whole_loss_and_gradients():
    """Through a real head: 2 global + 3 local crops of 7 images, in chunks of 1 and 3 images."""
    n_global, n_crops, batch = 2, 5, 7
    head, features, _ = _head_and_inputs(n_crops * batch)
    teacher = sinkhorn_knopp(torch.randn(n_global * batch, 64, dtype=torch.float64) * 3, 0.07).view(n_global, batch, 64)

    def loss_with(chunk_size: int):
        return lambda: DINOLoss(64, 0.1, chunk_size=chunk_size)(head(features).view(n_crops, batch, 64), teacher)

    whole, whole_grads = _loss_and_grads(loss_with(0), head, features)
    for chunk_size in (1, 3):
        _assert_same(*_loss_and_grads(loss_with(chunk_size), head, features), whole, whole_grads, chunk_size)


def test_chunked_sum_rejects_pieces_of_different_lengths():
    from fmct.ssl.chunked import chunked_sum

    with pytest.raises(ValueError, match="lengths along dim 0 differ"):
        chunked_sum(lambda a, b: a.sum() + b.sum(), (torch.zeros(4), torch.zeros(5)), 2)
