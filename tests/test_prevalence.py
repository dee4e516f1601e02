"cxr_pggan.prevalence: the vectorised bootstrap is the image bootstrap; labels from the classifier; archives."
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxr_pggan import prevalence as PR


def _labels(n=800, seed=0):
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, 5)) < [0.5, 0.2, 0.03, 0.3, 0.1]).astype(np.uint8)
    Y[:, 3] |= Y[:, 1]; Y[:, 4] &= Y[:, 0]          # correlated labels
    return Y


def test_patterns_roundtrip():
    Y = _labels()
    pats, counts = PR.label_patterns(Y)
    assert counts.sum() == len(Y) and len(np.unique(pats, axis=0)) == len(pats)
    # the pattern table reproduces every label count
    np.testing.assert_array_equal(counts @ pats, Y.sum(0))


def test_bootstrap_moments_are_exact():
    "Image bootstrap: mean p, variance p(1-p)/N, covariance (p_ab - p_a p_b)/N — including between labels."
    Y = _labels(); N = len(Y); p = Y.mean(0)
    D = PR.bootstrap_draws(Y, 40_000, seed=1)
    assert D.shape == (40_000, 5)
    assert (np.abs(D.mean(0) - p) <= 4 * np.sqrt(p * (1 - p) / N / 40_000) + 1e-12).all()
    np.testing.assert_allclose(D.var(0), p * (1 - p) / N, rtol=0.05)
    C = np.cov(D.T)
    exact = (Y.T.astype(float) @ Y / N - np.outer(p, p)) / N
    np.testing.assert_allclose(C, exact, atol=0.05 * np.abs(exact).max())


def test_matches_index_resampling_bootstrap():
    Y = _labels(300, 2); N = len(Y); rng = np.random.default_rng(3)
    naive = np.stack([Y[rng.integers(0, N, N)].mean(0) for _ in range(4000)])
    ours = PR.bootstrap_draws(Y, 4000, seed=4)
    np.testing.assert_allclose(np.quantile(ours, [0.025, 0.5, 0.975], axis=0), np.quantile(naive, [0.025, 0.5, 0.975], axis=0), atol=0.012)


def test_binomial_marginals_agree_and_chunking():
    Y = _labels(500, 5)
    a = PR.bootstrap_draws(Y, 20_000, seed=0, method='multinomial', chunk_cells=997)   # many small chunks
    b = PR.bootstrap_draws(Y, 20_000, seed=0, method='binomial')
    np.testing.assert_allclose(np.quantile(a, [0.025, 0.975], axis=0), np.quantile(b, [0.025, 0.975], axis=0), atol=0.006)
    np.testing.assert_array_equal(PR.bootstrap_draws(Y, 50, seed=9), PR.bootstrap_draws(Y, 50, seed=9))


def test_prevalence_table_and_errors():
    Y = _labels(200, 6)
    t = PR.bootstrap_prevalence(pd.DataFrame(Y, columns=list('abcde')), n_boot=2000, name='real')
    assert list(t.columns) == ['set', 'label', 'n', 'count', 'prevalence', 'ci_low', 'ci_high']
    assert (t.ci_low <= t.prevalence).all() and (t.prevalence <= t.ci_high).all() and (t.n == 200).all()
    z = PR.bootstrap_prevalence(np.zeros((10, 2), np.uint8), n_boot=100)
    assert (z.ci_high == 0).all()
    with pytest.raises(ValueError, match='0/1'): PR.bootstrap_prevalence(np.full((3, 2), 2))
    with pytest.raises(ValueError, match='2-D'): PR.bootstrap_prevalence(np.zeros(3))
    with pytest.raises(ValueError, match='method'): PR.bootstrap_draws(Y, 10, method='poisson')


def test_nih_scale_runs():
    "130,000 images × 15 labels × 10,000 resamples completes (timing is a benchmark's job, not a test's)."
    rng = np.random.default_rng(7)
    Y = (rng.random((130_000, 15)) < np.r_[0.5, np.full(14, 0.03)]).astype(np.uint8)
    t = PR.bootstrap_prevalence(Y, n_boot=10_000)
    assert len(t) == 15 and (t.ci_high - t.ci_low < 0.01).all()


class _Clf(torch.nn.Module):
    "Classifier contract stand-in: logit = brightness - 0.5 for label 1, 0.5 - brightness for label 0; thresholds on logits."
    input_size, labels = 16, ['No Finding', 'Effusion']
    def __init__(self, thr=(0.0, 0.0)):
        super().__init__(); self.register_buffer('thresholds', torch.tensor(thr))
    def embed(self, x): return x.mean((1, 2, 3))[:, None]
    def forward(self, x):
        assert x.shape[-1] == self.input_size
        m = self.embed(x); return torch.cat([0.5 - m, m - 0.5], 1)


def test_classifier_labels_use_youden_thresholds(tmp_path):
    files = []
    for i, v in enumerate([10, 100, 160, 250]):
        Image.fromarray(np.full((20, 20), v, np.uint8)).save(tmp_path / f'{i}.png'); files.append(tmp_path / f'{i}.png')
    lab = PR.classifier_labels(_Clf(), files, batch_size=3)
    assert lab.columns.tolist() == ['No Finding', 'Effusion'] and lab.to_numpy().tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]
    lab2 = PR.classifier_labels(_Clf((0.0, 0.3)), files)       # a stricter Effusion threshold
    assert lab2['Effusion'].tolist() == [0, 0, 0, 1]
    imgs = [torch.full((2, 1, 30, 30), 240, dtype=torch.uint8)]  # batches (e.g. from a generator)
    assert PR.classifier_labels(_Clf(), images=imgs)['Effusion'].tolist() == [1, 1]
    with pytest.raises(TypeError, match='thresholds'): PR.classifier_labels(torch.nn.Linear(1, 1), files)


def test_generated_labels_of_checkpoints_and_folders(tmp_path):
    "A generator checkpoint is sampled and classified; a folder of images (an archive) is classified; both by one classifier."
    from cxr_pggan.latent import random_networks
    from cxr_pggan.classifier import load_classifier
    from cxr_pggan.pggan import generate
    gp, cp = random_networks(tmp_path / 'nets')
    clf = load_classifier(cp)
    Yg = PR.generated_labels(gp, 6, clf, device='cpu')
    generate(gp, 6, tmp_path / 'pngs', seed=0, device='cpu')
    Yf = PR.generated_labels(tmp_path / 'pngs', None, clf, device='cpu')
    assert Yg.shape == Yf.shape == (6, 15)
    assert (Yg.to_numpy() == Yf.to_numpy()).all()          # the PNGs are exactly the samples the checkpoint gives for seed 0
    with pytest.raises(FileNotFoundError, match='no such'): PR.generated_labels(tmp_path / 'nothing', 4, clf)
