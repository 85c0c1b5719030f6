import pytest
import torch

from xtra_ds.models.tokens import image_blocks, normalize_blocks
from xtra_ds.objective import NextBlockLoss

from conftest import tiny


def test_targets_by_hand():
    # One 1-channel 4x4 image, 2x2-pixel blocks: blocks in raster order, flattened (c, row, col).
    img = torch.arange(16.0).view(1, 1, 4, 4)
    blocks = image_blocks(img, 2)
    assert blocks[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    t = normalize_blocks(blocks)
    b0 = torch.tensor([0.0, 1, 4, 5])
    mean, var_unbiased = 2.5, ((b0 - 2.5) ** 2).sum() / 3  # n-1
    torch.testing.assert_close(t[0, 0], (b0 - mean) / torch.sqrt(var_unbiased + 1e-6))


def test_multichannel_flatten_order():
    img = torch.arange(2 * 16.0).view(1, 2, 4, 4)
    assert image_blocks(img, 2)[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]  # channel-major


def test_loss_shifts_by_one_block():
    preds = torch.zeros(1, 3, 2)
    targets = torch.tensor([[[9.0, 9.0], [1.0, 1.0], [3.0, 3.0]]])
    preds[0, 0] = 1.0  # block 0 predicts block 1 exactly
    preds[0, 1] = 2.0  # block 1 predicts block 2 (=3): error 1
    preds[0, 2] = 100.0  # the last block predicts nothing
    assert NextBlockLoss()([preds], targets).item() == pytest.approx((0 + 0 + 1 + 1) / 4)
    assert NextBlockLoss("l1")([preds], targets).item() == pytest.approx((0 + 0 + 1 + 1) / 4)
    # two heads: head 1 at block 0 predicts block 2
    head1 = torch.full((1, 3, 2), 5.0)
    expected = ((0 + 0 + 1 + 1) / 4 + ((5 - 3) ** 2)) / 2
    assert NextBlockLoss()([preds, head1], targets).item() == pytest.approx(expected)


def test_model_loss_hand_computation():
    """The model's loss equals MSE(pred[:, :-1], normalised blocks of the image[:, 1:])."""
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    t = normalize_blocks(image_blocks(x, 16))
    torch.testing.assert_close(out.targets, t)
    expected = ((out.preds[0][:, :-1] - t[:, 1:]) ** 2).mean()
    torch.testing.assert_close(NextBlockLoss()(out.preds, out.targets), expected)


def test_random_order_targets_follow_order():
    model = tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    out = model(x, order=2)
    t = normalize_blocks(image_blocks(x, 16))
    torch.testing.assert_close(out.targets, t[:, model.block_orders[2]])


def test_bad_loss_kind():
    with pytest.raises(ValueError, match="expected 'mse' or 'l1'"):
        NextBlockLoss("huber")


@pytest.mark.parametrize("kind,heads", [("mse", 1), ("l1", 1), ("mse", 3)])
def test_loss_terms_split_the_loss_by_image_and_by_block_position(kind, heads):
    """Each image's loss averages to the loss; head 1's loss by block position is its per-position mean."""
    torch.manual_seed(0)
    B, nb, D = 4, 6, 5
    targets = torch.randn(B, nb, D)
    preds = [torch.randn(B, nb, D) for _ in range(heads)]
    fn = NextBlockLoss(kind)
    t = fn.terms(preds, targets)
    assert t.per_sample.shape == (B,) and t.per_block.shape == (nb - 1,)
    torch.testing.assert_close(t.loss, fn(preds, targets))
    for b in range(B):  # by hand: one image alone
        torch.testing.assert_close(t.per_sample[b], fn([p[b:b + 1] for p in preds], targets[b:b + 1]))
    err = preds[0][:, :-1] - targets[:, 1:]
    by_hand = (err.square() if kind == "mse" else err.abs()).mean(dim=(0, 2))
    torch.testing.assert_close(t.per_block, by_hand)
