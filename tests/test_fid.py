"cxr_pggan.features, .metrics and .fid: equality with pytorch-fid, offline weights, exact distances, the metric registry, caches, CLI."
import json, os, warnings
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import pytorch_fid.inception as pfi
from pytorch_fid import fid_score
from cxr_pggan import fid as FID
from cxr_pggan import features as FE
from cxr_pggan import metrics as M


@pytest.fixture(scope='module')
def rand_weights(tmp_path_factory):
    "A random FID-Inception state dict saved as a weights file (seed 3)."
    d = tmp_path_factory.mktemp('w')
    sd = FE.random_inception_state_dict(3)
    p = d / 'random_inception.pth'
    torch.save(sd, p)
    return p, sd


@pytest.fixture(scope='module')
def pngs(tmp_path_factory):
    "Four small 8-bit images: three grey, one RGB, of one size (pytorch-fid batches need one size)."
    d = tmp_path_factory.mktemp('img')
    rng = np.random.default_rng(0)
    for i in range(3):
        a = (np.clip(rng.normal(0.5, 0.2, (8, 8)).repeat(12, 0).repeat(12, 1) + rng.normal(0, 0.05, (96, 96)), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(a).save(d / f'g{i}.png')
    Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8)).save(d / 'rgb.png')
    return d


@pytest.fixture(scope='module')
def two(tmp_path_factory):
    "Two grey images (CLI tests: Inception on a shared 2-core CPU is slow)."
    d = tmp_path_factory.mktemp('two')
    rng = np.random.default_rng(1)
    for i in range(2): Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(d / f'{i}.png')
    return d


@pytest.fixture(scope='module')
def ext(rand_weights):
    return FE.fid_inception(rand_weights[0])


def _no_network(monkeypatch):
    def boom(*a, **k): raise AssertionError('attempted a download')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', boom)
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', boom)


def test_features_equal_pytorch_fid(rand_weights, pngs, ext, monkeypatch):
    "Our features/statistics equal pytorch-fid's own pipeline (files -> ToTensor -> InceptionV3) for the same weights."
    path, sd = rand_weights
    monkeypatch.setattr(pfi, 'load_state_dict_from_url', lambda url, *a, **k: sd)   # hand pytorch-fid our state dict
    ref_model = pfi.InceptionV3([3])
    files = sorted(pngs.glob('*.png'))
    ref = fid_score.get_activations(files, ref_model, batch_size=3, dims=2048, device='cpu', num_workers=0)
    ours = FE.extract_features(files, ext, batch_size=2, num_workers=0, device='cpu')
    assert ours.shape == ref.shape == (4, 2048)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    mu, sigma = np.mean(ref, axis=0), np.cov(ref, rowvar=False)   # = fid_score.calculate_activation_statistics
    st = M.FIDStats.from_features(ours)
    np.testing.assert_allclose(st.mu, mu, rtol=1e-5, atol=1e-6)
    # float32 features: thread-pool state (e.g. after torch.set_num_threads in another test) may move the last bits
    np.testing.assert_allclose(st.sigma, sigma, rtol=1e-4, atol=1e-6 * np.abs(sigma).max())


def test_grey_single_channel_path_equals_rgb(ext):
    "Resizing one grey channel then replicating equals pytorch-fid's RGB path (bit for bit in a fresh process; float32 noise allowed)."
    x = (torch.rand(2, 1, 50, 70) * 255).round().to(torch.uint8)
    with torch.inference_mode():
        a = ext(x)
        b = ext.net(torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1).float().div(255), size=(299, 299), mode='bilinear', align_corners=False))[0].flatten(1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weights_lookup_never_downloads(rand_weights, tmp_path, monkeypatch):
    _no_network(monkeypatch)
    path, _ = rand_weights
    monkeypatch.delenv(FE.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'th'))
    with pytest.raises(FileNotFoundError) as e: FE.fid_inception()
    msg = str(e.value)
    assert str(tmp_path / 'th' / 'hub' / 'checkpoints') in msg and FE.WEIGHTS_ENV in msg and FE.FID_WEIGHTS_FILE in msg
    with pytest.raises(FileNotFoundError, match='does not exist'): FE.fid_inception(tmp_path / 'nope.pth')
    monkeypatch.setenv(FE.WEIGHTS_ENV, str(tmp_path / 'missing.pth'))
    with pytest.raises(FileNotFoundError, match=FE.WEIGHTS_ENV): FE.fid_inception()
    monkeypatch.setenv(FE.WEIGHTS_ENV, str(path))
    with pytest.warns(UserWarning, match='not comparable'):
        m = FE.fid_inception()
    assert m.meta['weights_source'] == f'${FE.WEIGHTS_ENV}' and not m.random_weights and not m.meta['official_weights']
    monkeypatch.delenv(FE.WEIGHTS_ENV)
    hub = tmp_path / 'th' / 'hub' / 'checkpoints'; hub.mkdir(parents=True)
    os.symlink(path, hub / FE.FID_WEIGHTS_FILE)
    with pytest.warns(UserWarning):
        m = FE.fid_inception()
    assert m.meta['weights_source'] == 'torch hub cache'
    assert pfi.load_state_dict_from_url is not None and pfi.load_state_dict_from_url.__name__ != '_load'   # patch undone


def test_random_weights_are_labelled(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.delenv(FE.WEIGHTS_ENV, raising=False)
    m = FE.fid_inception(allow_random_weights=True)
    assert m.random_weights and m.meta['label'] == FE.RANDOM_WEIGHTS_LABEL
    r = M.FIDResult(1.0, 3, 4, 'inception', m.meta['label'], True)
    assert 'N=3 vs N=4' in str(r) and FE.RANDOM_WEIGHTS_LABEL in str(r)


def _cov(d, rng, scale=1.0):
    A = rng.standard_normal((2 * d, d)) * rng.uniform(0.5, 1.5, d)
    return scale * A.T @ A / (2 * d) + 0.01 * np.eye(d)


@pytest.mark.parametrize('backend', ['numpy', 'torch'])
def test_frechet_parity_full_rank(backend):
    rng = np.random.default_rng(0); d = 256
    m1, m2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
    S1, S2 = _cov(d, rng), _cov(d, rng, 1.3)
    ref = M.frechet_distance_sqrtm(m1, S1, m2, S2)
    got = M.frechet_distance(m1, S1, m2, S2, backend=backend)
    assert abs(got - ref) <= 1e-6 * abs(ref), (got, ref)
    assert abs(M.frechet_distance(m1, S1, m1, S1, backend=backend)) < 1e-8 * np.trace(S1)


@pytest.mark.slow
def test_frechet_parity_2048():
    rng = np.random.default_rng(1); d = 2048
    m1, m2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
    S1, S2 = _cov(d, rng), _cov(d, rng, 1.2)
    ref = M.frechet_distance_sqrtm(m1, S1, m2, S2)
    assert abs(M.frechet_distance(m1, S1, m2, S2) - ref) <= 1e-6 * abs(ref)


def test_pairwise_and_low_rank_routes_agree_with_scipy():
    rng = np.random.default_rng(2); d = 96
    groups = {'a': rng.standard_normal((40, d)),                       # N < D: low-rank factor
              'b': rng.standard_normal((300, d)) * 1.3 + 0.2,          # N > D: Σ^½ factor
              'c': rng.standard_normal((150, d)) @ np.diag(rng.uniform(0.5, 2, d))}
    st = {k: M.FIDStats.from_features(v) for k, v in groups.items()}
    P = M.pairwise_fid(groups, progress_bar=False)
    Ps = M.pairwise_fid(st, progress_bar=False)
    for i in groups:
        for j in groups:
            if i == j: assert abs(P.loc[i, j]) < 1e-9; continue
            ref = M.frechet_distance_sqrtm(st[i].mu, st[i].sigma, st[j].mu, st[j].sigma)
            assert abs(P.loc[i, j] - ref) <= 1e-6 * ref and abs(Ps.loc[i, j] - ref) <= 1e-6 * ref
            assert abs(M.fid_from_features(groups[i], groups[j]) - ref) <= 1e-6 * ref
    assert np.allclose(P.to_numpy(), P.to_numpy().T)


def test_shape_errors():
    with pytest.raises(ValueError, match='shapes'): M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match='backend'): M.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), backend='gpu')


def test_kid_unbiased_and_sensitive():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((400, 32)), rng.standard_normal((400, 32))
    m, s = M.kid(a, b, n_subsets=20, subset_size=200)
    assert abs(m) < 3 * s + 1e-3
    assert M.kid(a, b + 0.3, n_subsets=20, subset_size=200)[0] > 10 * max(abs(m), s)
    with pytest.raises(ValueError): M.kid(a[:1], b)


def test_small_n_warns_and_prints_n():
    rng = np.random.default_rng(4)
    with pytest.warns(UserWarning, match='N=10 < 2048'):
        r = M.fid_result(rng.standard_normal((10, 8)), rng.standard_normal((12, 8)), dict(features='inception', label='x'), kid_subsets=2)
    assert 'N=10 vs N=12' in str(r) and r.kid_mean is not None


def test_stats_npz_roundtrip_and_comparability(tmp_path, ext):
    rng = np.random.default_rng(5)
    st = M.FIDStats.from_features(rng.standard_normal((20, 6)), ext.meta)
    p = st.save(tmp_path / 's.npz')
    with np.load(p) as z: assert set(['mu', 'sigma']) <= set(z.keys())   # pytorch-fid can read it
    back = M.FIDStats.load(p)
    assert back.n == 20 and back.meta['weights_sha256'] == ext.meta['weights_sha256'] and back.meta['convention'] == FE.INCEPTION_CONVENTION
    np.testing.assert_array_equal(back.sigma, st.sigma)
    other = M.FIDStats(st.mu, st.sigma, 20, dict(ext.meta, weights_sha256='0' * 64))
    with pytest.raises(ValueError, match='weights_sha256'): M.fid_from_stats(back, other)
    np.savez(tmp_path / 'plain.npz', mu=st.mu, sigma=st.sigma)            # a plain pytorch-fid file
    assert M.FIDStats.load(tmp_path / 'plain.npz').meta['features'].startswith('unknown')


def test_feature_cache_subsets_and_invalidation(tmp_path, ext):
    rng = np.random.default_rng(6); files = []
    for i in range(3):
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(tmp_path / f'{i}.png'); files.append(tmp_path / f'{i}.png')
    cache = tmp_path / 'c.npz'
    f_all = FE.extract_features(files, ext, batch_size=2, cache=cache)
    c = FE.FeatureCache(cache, FE.extractor_id(ext))
    hit, miss = c.lookup(files[::-1]); assert miss == [] and np.array_equal(hit, f_all[::-1])
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(files[1]); os.utime(files[1], ns=(1, 1))   # changed file
    hit, miss = FE.FeatureCache(cache, FE.extractor_id(ext)).lookup(files); assert miss == [1]
    f2 = FE.extract_features(files, ext, cache=cache)
    assert np.array_equal(f2[[0, 2]], f_all[[0, 2]]) and not np.array_equal(f2[1], f_all[1])
    with pytest.warns(UserWarning, match='another extractor'): FE.FeatureCache(cache, 'other')


def test_image_loading_modes_and_sources(tmp_path):
    rng = np.random.default_rng(7)
    a16 = (rng.random((20, 20)) * 65535).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / 'x16.png')
    t = FE.image_tensor(tmp_path / 'x16.png')
    assert t.dtype == torch.float32 and t.shape == (1, 20, 20) and abs(float(t.max()) - a16.max() / 65535) < 1e-6
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / 'c.png')
    Image.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)).save(tmp_path / 'g.png')
    b = FE.collate_images([FE.image_tensor(tmp_path / 'g.png'), FE.image_tensor(tmp_path / 'c.png')])
    assert b.shape == (2, 3, 20, 20) and b.dtype == torch.float32
    (tmp_path / 'bad.png').write_bytes(b'not a png')
    with pytest.raises(OSError, match='bad.png'): FE.image_tensor(tmp_path / 'bad.png')
    # sources: NIH layout folder, CSV with Image Index, CSV with path, seeded subsets
    root = tmp_path / 'nih'; (root / 'images').mkdir(parents=True)
    names = [f'0000000{i}_000.png' for i in range(6)]
    for n in names: Image.fromarray(np.full((8, 8), 9, np.uint8)).save(root / 'images' / n)
    assert len(FE.image_paths(root)) == 6
    import pandas as pd
    pd.DataFrame({'Image Index': names[:4]}).to_csv(root / 'Data_Entry_2017.csv', index=False)
    assert [Path(p).name for p in FE.image_paths(root / 'Data_Entry_2017.csv')] == names[:4]
    pd.DataFrame({'path': [f'images/{n}' for n in names[2:]]}).to_csv(root / 'list.csv', index=False)
    assert len(FE.image_paths(root / 'list.csv')) == 4
    s1, s2 = FE.image_paths(root, n=3, seed=1), FE.image_paths(root, n=3, seed=1)
    assert s1 == s2 and len(s1) == 3 and s1 == sorted(s1)
    with pytest.raises(FileNotFoundError, match='no such'): FE.image_paths(tmp_path / 'nothing')
    pd.DataFrame({'x': [1]}).to_csv(tmp_path / 'bad.csv', index=False)
    with pytest.raises(KeyError, match="'path' column"): FE.image_paths(tmp_path / 'bad.csv')


class _StandIn(torch.nn.Module):
    "Honours the classifier contract: embed -> (N, 1024), forward -> 15 logits, thresholds, labels, input_size."
    input_size = 32
    def __init__(self):
        super().__init__()
        from cxr_pggan.data import LABELS
        self.labels = list(LABELS); self.thresholds = torch.zeros(15)
        self.conv = torch.nn.Conv2d(1, 1024, 8, 8); self.head = torch.nn.Linear(1024, 15)
    def embed(self, x):
        assert x.shape[-1] == self.input_size
        return self.conv(x[:, :1]).mean((2, 3))
    def forward(self, x): return self.head(self.embed(x))


def test_classifier_features_standin_and_checkpoint(pngs, tmp_path):
    torch.manual_seed(0)
    cx = FE.classifier_features(_StandIn())
    files = sorted(pngs.glob('*.png'))
    f = FE.extract_features(files, cx, batch_size=4)
    assert f.shape == (4, 1024) and cx.meta['features'] == 'classifier' and cx.dim == 1024
    with pytest.raises(TypeError, match='embed'): FE.classifier_features(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match='classifier checkpoint'): FE.load_extractor(f'classifier:{tmp_path / "none.pt"}')
    clf = pytest.importorskip('cxr_pggan.classifier')
    m = clf.densenet_classifier(input_size=32, pretrained=False)
    ck = clf.save_classifier(m, tmp_path / 'clf.pt')
    e = FE.load_extractor(f'classifier:{ck}')
    g = FE.extract_features(files[:2], e, batch_size=2)
    assert g.shape == (2, 1024) and e.meta['weights_sha256'] == FE.file_sha256(ck)
    assert 'DenseNet-121 penultimate' in e.meta['label']                        # labelled by the classifier it is
    r = M.fid_result(g, g[::-1] + 0.1, e.meta, with_kid=False)
    assert str(r).startswith('FID_CXR') and 'clf.pt' in str(r)


def _fid(*argv):
    "`cxr-pggan fid ...` in-process, through the entry point (one-line errors, exit status 2)."
    from cxr_pggan.cli import main
    return main(['fid', *map(str, argv)])


def test_cli_refuses_without_weights_and_labels_random(two, tmp_path, monkeypatch, capsys):
    pngs = two
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'th')); monkeypatch.delenv(FE.WEIGHTS_ENV, raising=False)
    assert _fid('--real', pngs, '--fake', pngs) == 2
    err = capsys.readouterr().err
    assert 'hub' in err and FE.FID_WEIGHTS_FILE in err and len(err.strip().splitlines()) == 1
    out = tmp_path / 'r.json'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert FID.fid_cli(['--real', str(pngs), '--fake', str(pngs), '--allow-random-weights', '--kid-subsets', '2',
                            '--json', str(out), '--save-stats', str(tmp_path / 'a.npz'), str(tmp_path / 'b.npz')]) == 0
    line = capsys.readouterr().out
    assert 'N=2 vs N=2' in line and FE.RANDOM_WEIGHTS_LABEL in line
    rec = json.loads(out.read_text())
    assert rec['warning'] == FE.RANDOM_WEIGHTS_LABEL and abs(rec['result']['fid']) < 1e-6
    assert (tmp_path / 'r.json.provenance.json').exists()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert FID.fid_cli(['--real', str(tmp_path / 'a.npz'), '--fake', str(tmp_path / 'b.npz')]) == 0   # stats only: no weights needed
    assert _fid('--real', tmp_path / 'nope', '--fake', pngs, '--allow-random-weights') == 2


def test_cli_generator_checkpoint(two, tmp_path, monkeypatch, capsys):
    pg = pytest.importorskip('cxr_pggan.pggan')
    cfg = pg.make_config('segal2021', resolution=16, latent_dim=16, depths=[16, 8, 8])
    torch.manual_seed(0)
    G = pg.Generator(cfg, resolution=16)
    ck = pg.save_pggan(tmp_path / 'g.pt', cfg, G_ema=G)
    with pytest.raises(ValueError, match='--n'): FE.set_features(ck, None)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert FID.fid_cli(['--real', str(two), '--fake', str(ck), '--n', '2', '--allow-random-weights', '--kid-subsets', '0']) == 0
    assert 'N=2 vs N=2' in capsys.readouterr().out


def test_metric_registry_drives_table1():
    "A metric registered in one place is computed by Table 1; FID through the registry equals scipy's sqrtm route."
    assert {'fid', 'kid', 'fid_cxr', 'kid_cxr'} <= set(M.METRICS)
    from cxr_pggan.data import LABELS
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({'Patient Sex': ['M', 'F'] * 30, **{l: 0 for l in LABELS}})
    frame.loc[:29, 'No Finding'] = 1; frame.loc[30:, 'Effusion'] = 1
    X = rng.standard_normal((60, 12)); X[30:] += 1
    @M.register_metric('mean_gap', 'inception', ('MEAN_GAP',))
    def _mean_gap(a, b, **_): return dict(MEAN_GAP=float(np.abs(a.features('mean_gap').mean(0) - b.features('mean_gap').mean(0)).sum()))
    try:
        t = FID.comparison_rows(frame, {'inception': (X, {})}, ['fid', 'mean_gap'], min_n=5).set_index('comparison')
    finally: M.METRICS.pop('mean_gap')
    assert list(t.columns[-2:]) == ['FID', 'MEAN_GAP']
    row = t.loc['No Finding vs Effusion']
    a, b = X[:30], X[30:]
    ref = M.frechet_distance_sqrtm(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert abs(row['FID'] - ref) <= 1e-6 * ref and row['MEAN_GAP'] > 10
    assert np.isnan(t.loc['No Finding vs Hernia', 'FID'])                     # too few images: left empty
    with pytest.raises(ValueError, match='unknown metric'): M.check_metrics('fid,nope')


def test_cli_metrics_and_classifier_features(two, tmp_path, capsys):
    clf = pytest.importorskip('cxr_pggan.classifier')
    ck = clf.save_classifier(clf.densenet_classifier(input_size=32, pretrained=False), tmp_path / 'clf.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert FID.fid_cli(['--real', str(two), '--fake', str(two), '--metrics', 'fid_cxr,kid_cxr', '--classifier', str(ck),
                            '--kid-subsets', '2', '--json', str(tmp_path / 'r.json')]) == 0
    out = capsys.readouterr().out
    assert out.startswith('FID_CXR') and 'N=2 vs N=2' in out and 'clf.pt' in out
    rec = json.loads((tmp_path / 'r.json').read_text())
    assert set(rec['metrics']) == {'FID_CXR', 'KID_CXR', 'KID_CXR_std'}
    assert _fid('--real', two, '--fake', two, '--metrics', 'nope') == 2
    assert 'unknown metric' in capsys.readouterr().err


@pytest.mark.parametrize('backend', ['numpy', 'torch'])
def test_frechet_of_a_set_with_itself_is_exactly_zero(backend):
    "Rounding leaves ±1e-13 where the distance is 0; every route returns +0.0 (never -0.0, which prints as -0.000)."
    X = np.random.default_rng(7).standard_normal((50, 12)) * 1e3
    s = M.FIDStats.from_features(X)
    vals = [M.frechet_distance(s.mu, s.sigma, s.mu, s.sigma, backend), M.fid_from_features(X, X, backend),
            M.frechet_from_factors(M.fid_factor(stats=s, backend=backend), M.fid_factor(stats=s, backend=backend), backend),
            M.frechet_distance_sqrtm(s.mu, s.sigma, s.mu, s.sigma)]
    assert all(v == 0.0 and np.copysign(1.0, v) == 1.0 for v in vals), vals
    assert f"{M.FIDResult(-0.0, 2, 2).fid:.3f}" == '0.000'


def _not_euclidean(n=9, seed=0):
    A = np.random.default_rng(seed).random((n, n)) * 10
    D = (A + A.T) ** 2; np.fill_diagonal(D, 0)                                  # squared distances: not a metric
    J = np.eye(n) - 1 / n
    assert np.linalg.eigvalsh(-0.5 * J @ D ** 2 @ J).min() < -1e3               # a large negative eigenvalue
    return D


def test_mds_of_a_non_euclidean_matrix_is_finite_and_deterministic():
    for D in (np.array([[0, 1, 4], [1, 0, 1], [4, 1, 0.]]), _not_euclidean()):
        e = FID.mds_embedding(D, seed=3)
        assert e.shape == (len(D), 2) and np.isfinite(e).all()
        assert np.array_equal(e, FID.mds_embedding(D, seed=3))
    c = FID.classical_mds(_not_euclidean())
    assert np.isfinite(c).all() and np.array_equal(c, FID.classical_mds(_not_euclidean()))


def test_mds_speaks_both_scikit_learn_apis(monkeypatch):
    "Old scikit-learn (`dissimilarity='precomputed'`, `metric=True`) and new (`metric='precomputed'`, `metric_mds=True`)."
    import sklearn.manifold
    seen = {}
    class Old:
        def __init__(self, n_components=2, *, metric=True, n_init=4, max_iter=300, verbose=0, eps=1e-3, n_jobs=None,
                     random_state=None, dissimilarity='euclidean', normalized_stress='auto'): seen['old'] = dict(metric=metric, dissimilarity=dissimilarity, n_init=n_init)
    monkeypatch.setattr(sklearn.manifold, 'MDS', Old)
    FID._smacof(0)
    assert seen['old'] == dict(metric=True, dissimilarity='precomputed', n_init=1)
    monkeypatch.undo()
    m = FID._smacof(0)
    if 'metric_mds' in m.get_params(): assert m.get_params()['metric'] == 'precomputed' and m.get_params()['metric_mds'] is True
    else: assert m.get_params()['dissimilarity'] == 'precomputed'


def test_figure5_embeds_the_frechet_distance(monkeypatch):
    "Figure 5's MDS and dendrogram read √FID (a metric), say so, and never fail on an FID matrix that is not Euclidean."
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    names = ['No Finding', 'Cardiomegaly', 'Effusion']
    P = pd.DataFrame([[0, 1, 4], [1, 0, 1], [4, 1, 0.]], index=names, columns=names)   # FIDs of N(0), N(1), N(2): not Euclidean
    got = {}
    real = FID.mds_embedding
    monkeypatch.setattr(FID, 'mds_embedding', lambda D, seed=0: got.setdefault('D', D) is not None and real(D, seed))
    fig = FID.figure5(P, {n: 10 for n in names})
    assert np.allclose(got['D'], np.sqrt(P.to_numpy()))
    assert [a.get_title() for a in fig.axes[1:3]] == ['2-D metric MDS of √FID (Fréchet distance)', 'Hierarchical clustering (average linkage on √FID)']
    assert fig.axes[2].get_xlabel() == '√FID (Fréchet distance)'
    plt.close(fig)
