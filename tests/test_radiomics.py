"""First-order HU features (the radiomics floor) on volumes small enough to count by hand."""

import numpy as np
import pytest
import torch

from fmct.eval.radiomics import BIN_CENTRES_HU, FEATURE_COLUMNS, PERCENTILES, first_order_features


def test_histogram_and_statistics_counted_by_hand():
    # 12 voxels, 10 of them head (above -300 HU). The bins span -52..152 HU: -53 and 153 fall just outside, 1000 too.
    hu = torch.tensor([-1024, -1024, -53, -52, 0, 3, 10, 40, 40, 152, 153, 1000], dtype=torch.int16).view(1, 1, 3, 2, 2)
    features = dict(zip(FEATURE_COLUMNS, first_order_features(hu)[0].tolist()))
    assert len(features) == 41 + 7
    by_hand = {-50: 1, 0: 1, 5: 1, 10: 1, 40: 2, 150: 1}  # voxels per bin centre (-52 | 0 | 3 | 10 | 40, 40 | 152)
    for centre in BIN_CENTRES_HU:
        assert features[f"hist_{centre}"] == pytest.approx(by_hand.get(centre, 0) / 10), centre
    # Within 0..100 HU: 0, 3, 10, 40, 40.
    assert features["mean"] == pytest.approx(93 / 5)
    assert features["std"] == pytest.approx(np.sqrt((18.6**2 + 15.6**2 + 8.6**2 + 2 * 21.4**2) / 5))
    assert [features[f"p{p}"] for p in PERCENTILES] == [0, 3, 10, 40, 40]


def test_features_match_numpy_on_a_noisy_volume_and_do_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    volumes = np.round(rng.normal(30, 60, size=(2, 1, 12, 10, 8))).astype(np.int16)
    volumes[:, :, :2] = -1024  # some air
    features = first_order_features(torch.from_numpy(volumes)).numpy()
    for b, volume in enumerate(volumes[:, 0]):
        head = volume[volume > -300]
        shares, _ = np.histogram(head, bins=np.arange(-52.5, 153, 5))
        np.testing.assert_allclose(features[b, :41], shares / head.size, rtol=1e-6)
        brain = volume[(volume >= 0) & (volume <= 100)].astype(np.float64)
        expected = [brain.mean(), brain.std(), *np.percentile(brain, PERCENTILES, method="inverted_cdf")]
        np.testing.assert_allclose(features[b, 41:], expected, rtol=1e-5)
        np.testing.assert_array_equal(
            first_order_features(torch.from_numpy(volumes[b : b + 1]))[0].numpy(), features[b]
        )


def test_statistics_are_nan_without_a_voxel_in_their_range():
    hu = torch.full((1, 1, 2, 2, 2), -1024, dtype=torch.int16)
    hu[0, 0, 0, 0, 0] = 500
    features = first_order_features(hu)[0]
    assert torch.all(features[:41] == 0) and torch.all(torch.isnan(features[41:]))
