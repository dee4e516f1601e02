"Tests of cxr_pggan.classifier: weights discovery, the model contract, loss, metrics, checkpoints, training and CLI."
import json, os, re, warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
import torch.nn.functional as F

from cxr_pggan.data import LABELS
from cxr_pggan import classifier as C


def _fake_imagenet_file(path: Path) -> dict:
    "A file laid out like torchvision's densenet121-a639ec97.pth (old key names, no num_batches_tracked), random numbers."
    from torchvision.models import densenet121
    ref = densenet121(weights=None).state_dict()
    old = {re.sub(r'(denselayer\d+\.(?:norm|relu|conv))([12])\.', r'\1.\2.', k): v for k, v in ref.items() if 'num_batches' not in k}
    torch.save(old, path)
    return ref


@pytest.fixture(scope='module')
def small_clf():
    return C.densenet_classifier(input_size=32, pretrained=False).eval()


def test_weights_search_order(tmp_path, monkeypatch):
    monkeypatch.delenv(C.DENSENET_ENV, raising=False)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    p, why = C.find_densenet_weights()
    assert p is None and 'absent' in why
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        m = C.densenet_classifier(input_size=32)
    assert m.init_weights is None and any('RANDOM' in str(x.message) for x in w)
    # hub cache
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    ref = _fake_imagenet_file(tmp_path / 'hub' / 'checkpoints' / C.DENSENET_FILE)
    m = C.densenet_classifier(input_size=32)
    assert m.init_weights['found_via'] == 'torch hub cache'
    assert m.init_weights['sha256'] and m.init_weights['name'] == 'densenet121_imagenet'
    assert torch.equal(m.features.denseblock4.denselayer16.conv2.weight, ref['features.denseblock4.denselayer16.conv2.weight'])
    assert torch.equal(m.features.norm5.running_var, ref['features.norm5.running_var'])
    # env var beats the hub cache, argument beats the env var
    other = tmp_path / 'env.pth'; _fake_imagenet_file(other)
    monkeypatch.setenv(C.DENSENET_ENV, str(other))
    assert C.find_densenet_weights() == (other, f'${C.DENSENET_ENV}')
    assert C.find_densenet_weights(tmp_path / 'hub' / 'checkpoints' / C.DENSENET_FILE)[1] == 'argument'
    monkeypatch.setenv(C.DENSENET_ENV, str(tmp_path / 'gone.pth'))
    with pytest.raises(FileNotFoundError, match='gone.pth'): C.find_densenet_weights()


def test_contract_shapes_channels_and_grad(small_clf):
    x1 = torch.rand(2, 1, 40, 40)
    assert small_clf.embed(x1).shape == (2, 1024) and small_clf(x1).shape == (2, len(LABELS))
    # a grey image and its 3-channel copy give the same output
    torch.testing.assert_close(small_clf(x1), small_clf(x1.expand(-1, 3, -1, -1)))
    # ImageNet normalisation is inside: the model sees (x - mean) / std
    x = small_clf.resize(x1).expand(-1, 3, -1, -1)
    h = F.adaptive_avg_pool2d(F.relu(small_clf.features((x - small_clf.mean) / small_clf.std)), 1).flatten(1)
    torch.testing.assert_close(small_clf.embed(x1), h)
    # resize is differentiable: gradients reach the input image (needed by latent optimisation)
    xg = torch.rand(1, 1, 64, 64, requires_grad=True)
    small_clf(xg)[0, 2].backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert small_clf.labels == LABELS and small_clf.thresholds.shape == (15,) and small_clf.input_size == 32
    with pytest.raises(ValueError, match=r'\(N, 1\|3, H, W\)'): small_clf(torch.rand(1, 32, 32))


def test_weighted_bce_matches_eq3():
    y = (torch.rand(50, 15) < 0.2).float(); y[0] = 1; y[1] = 0
    wp, wn = C.bce_class_weights(y.numpy())
    n, npos = 50, y.sum(0)
    torch.testing.assert_close(wp, n / npos); torch.testing.assert_close(wn, n / (n - npos))
    x = torch.randn(50, 15)
    p = torch.sigmoid(x)
    ref = -(wp * y * torch.log(p) + wn * (1 - y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(C.WeightedBCE(wp, wn)(x, y), ref, rtol=1e-5, atol=1e-6)


def test_auc_table_and_youden():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    y = (rng.random((400, 15)) < 0.3).astype(int)
    s = y * rng.uniform(0, 2, 15) + rng.normal(size=(400, 15))
    t = C.roc_auc_table(y, s, n_boot=200)
    assert list(t.label) == LABELS + ['macro']
    np.testing.assert_allclose(t.auc[:15], [roc_auc_score(y[:, c], s[:, c]) for c in range(15)], atol=1e-12)
    assert ((t.ci_low <= t.auc) & (t.auc <= t.ci_high)).all()
    assert (t.ci_high - t.ci_low).between(0.01, 0.3).all()
    np.testing.assert_allclose(t.auc.iloc[-1], t.auc[:15].mean())
    thr = C.youden_thresholds(y, s)
    for c in (0, 7):
        cand = np.unique(s[:, c])
        j = [((s[:, c] >= v) & (y[:, c] == 1)).mean() / y[:, c].mean() - ((s[:, c] >= v) & (y[:, c] == 0)).mean() / (1 - y[:, c].mean()) for v in cand]
        jt = ((s[:, c] >= thr[c]) & (y[:, c] == 1)).mean() / y[:, c].mean() - ((s[:, c] >= thr[c]) & (y[:, c] == 0)).mean() / (1 - y[:, c].mean())
        assert abs(jt - max(j)) < 1e-12
    # a class with one label value -> undefined AUC, NaN CI, threshold 0 with a warning
    y[:, 3] = 0
    t = C.roc_auc_table(y, s, n_boot=50)
    assert np.isnan(t.auc[3]) and np.isfinite(t.auc.iloc[-1]) and t.note[3].startswith('no positives')
    with pytest.warns(UserWarning, match='Effusion'): assert C.youden_thresholds(y, s)[3] == 0
    y[:4, 3] = 1                                                     # 4 positives: AUC shown, CI withheld and said so
    t = C.roc_auc_table(y, s, n_boot=50)
    assert np.isfinite(t.auc[3]) and np.isnan(t.ci_low[3]) and np.isnan(t.ci_high[3]) and 'no CI' in t.note[3] and t.n_pos[3] == 4


def test_checkpoint_roundtrip_and_errors(tmp_path, small_clf):
    small_clf.thresholds.copy_(torch.arange(15.) / 10)
    C.save_classifier(small_clf, tmp_path / 'c.pt', summary={'x': 1})
    m = C.load_classifier(tmp_path / 'c.pt')
    assert not m.training and m.labels == LABELS and m.input_size == 32
    torch.testing.assert_close(m.thresholds, torch.arange(15.) / 10)
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(m(x), small_clf(x)); torch.testing.assert_close(m.embed(x), small_clf.embed(x))
    rec = C.read_classifier_checkpoint(tmp_path / 'c.pt')
    assert rec['labels'] == LABELS and rec['threshold_space'] == 'logit' and len(rec['thresholds']) == 15
    assert C.classifier_provenance(tmp_path / 'c.pt')['classifier']['init_weights'].startswith('none')
    with pytest.raises(FileNotFoundError, match='train-classifier'): C.load_classifier(tmp_path / 'missing.pt')
    torch.save({'format': 'something else'}, tmp_path / 'o.pt')
    with pytest.raises(ValueError, match="'something else'"): C.load_classifier(tmp_path / 'o.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a torch file')
    with pytest.raises(ValueError, match='junk.pt'): C.load_classifier(tmp_path / 'junk.pt')


def _gan(tmp_path, res=16):
    from cxr_pggan.pggan import make_config, Discriminator, Generator, save_pggan
    cfg = make_config('segal2021', resolution=res, depths=[16, 16, 8][:int(np.log2(res)) - 1], latent_dim=16)
    torch.manual_seed(0)                                              # the same GAN whatever ran before (the recipe test depends on it)
    D = Discriminator(cfg, res)
    return save_pggan(tmp_path / 'gan.pt', cfg, G=Generator(cfg, res), D=D), D


def test_discriminator_classifier(tmp_path):
    gan, D = _gan(tmp_path)
    m = C.discriminator_classifier(gan)
    assert m.input_size == 16 and m.init_weights['name'] == 'pggan_discriminator'
    torch.testing.assert_close(m.D.blocks[0].conv0.weight, D.blocks[0].conv0.weight)
    x = torch.rand(5, 1, 32, 32)
    out = m(x)
    assert out.shape == (5, 15)
    torch.testing.assert_close(out[2:3], m(x[2:3]))        # independent of batch mates
    # inputs in [0,1] are fed to D in its own range (segal2021: [0,1]); the trunk equals D's trunk before the head
    C.save_classifier(m, tmp_path / 'd.pt')
    m2 = C.load_classifier(tmp_path / 'd.pt')
    torch.testing.assert_close(m2(x), m.eval()(x))
    from cxr_pggan.pggan import save_pggan, make_config, Generator
    cfg = make_config('segal2021', resolution=16, depths=[16, 16, 8], latent_dim=16)
    save_pggan(tmp_path / 'g_only.pt', cfg, G=Generator(cfg, 16))
    with pytest.raises(ValueError, match='no discriminator'): C.discriminator_classifier(tmp_path / 'g_only.pt')


def test_training_learns_with_discriminator_recipe(tmp_path):
    "Cardiomegaly images are brighter in the toy set: the recipe must learn it (AUC well above chance)."
    df = C._toy_frame(tmp_path / 'toy', n=120, size=16, seed=3)
    df['split'] = np.where(np.arange(120) < 80, 'train', np.where(np.arange(120) < 100, 'val', 'test'))
    gan, _ = _gan(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        r = C.fit_classifier(df, tmp_path / 'd.pt', arch='discriminator', discriminator=gan, epochs=6, batch_size=16,
                             lr=1e-3, n_boot=50, log=lambda *a: None)
    auc = r['auc'].set_index('label').auc
    assert auc['Cardiomegaly'] > 0.8, r['auc']
    assert len(r['history']) >= 1 and all(np.isfinite(h['loss']) for h in r['history'])
    m = C.load_classifier(tmp_path / 'd.pt')
    torch.testing.assert_close(m.thresholds, r['model'].thresholds.cpu())
    prov = json.loads((tmp_path / 'd.pt.provenance.json').read_text())
    assert prov['pretrained_weights']['init']['name'] == 'pggan_discriminator'


def test_early_stopping_and_plateau(tmp_path):
    "With lr ~0 nothing improves: ReduceLROnPlateau fires and early stopping ends the run after `patience` epochs."
    df = C._toy_frame(tmp_path / 'toy', n=40, size=16)
    gan, _ = _gan(tmp_path)
    from cxr_pggan.data import CXRDataset
    m = C.discriminator_classifier(gan)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        r = C.train_classifier(m, CXRDataset(df[:24], 16, augment=True), CXRDataset(df[24:], 16), epochs=10, batch_size=8,
                               lr=1e-7, patience=2, lr_patience=0, log=lambda *a: None)
    assert len(r['history']) == 3 and r['best_epoch'] == 1
    assert r['history'][-1]['lr'] < r['history'][0]['lr']


def test_cli(tmp_path):
    d = tmp_path / 'nih'
    df = C._toy_frame(d, n=60, size=16)
    df.drop(columns='path').assign(**{'Finding Labels': ['|'.join(l for l in LABELS if r[l]) for _, r in df.iterrows()],
                                      'Follow-up #': 0, 'Patient Age': 50, 'Patient Sex': 'F', 'View Position': 'PA'}
                                   ).drop(columns=LABELS).to_csv(d / 'Data_Entry_2017.csv', index=False)
    gan, _ = _gan(tmp_path)
    out = tmp_path / 'clf.pt'
    rc = C.train_classifier_cli(['--profile', 'smoke', '--data', str(d), '--arch', 'discriminator', '--discriminator', str(gan),
                                 '--set', 'epochs=1', '--set', 'max_steps=null', '--set', 'n_boot=20', '--out', str(out)])
    assert rc == 0 and out.exists() and (tmp_path / 'clf.auc.csv').exists()
    t = pd.read_csv(tmp_path / 'clf.auc.csv')
    assert list(t.label) == LABELS + ['macro']
    from cxr_pggan.cli import main
    out2 = tmp_path / 'clf2.pt'
    assert main(['train-classifier', '--data', str(tmp_path / 'none'), '--out', str(out2)]) == 2
    assert main(['train-classifier', '--profile', 'smoke', '--data', str(d), '--arch', 'discriminator', '--out', str(out2)]) == 2
    assert main(['train-classifier', '--profile', 'smoke', '--data', str(d), '--set', 'no_such_knob=1', '--out', str(out2)]) == 2
