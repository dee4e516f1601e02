"""The privacy audit: exact search and PRDC against references, and the proof on planted copies (phantom, where the
truth is known): at its default settings the audit flags >= 95 % of planted near-copies of training images (shifted
by up to ±5 % of the size; >= 90 % of those also turned by up to 3°) in 32², 64² and 128² archives, and <= 5 % of
real images of other patients."""
import json, os, subprocess, sys, warnings
from pathlib import Path

import numpy as np, pandas as pd, pytest

from cxr_pggan.privacy import nearest_neighbours, prdc, plant_copies, image_records, planted_rates


def prdc_reference(real, fake, k):
    "Naeem et al. (2020) written out directly on full distance matrices (the definition of the `prdc` package)."
    d = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    rr, ff, rf = d(real, real), d(fake, fake), d(real, fake)
    r_rad, f_rad = np.sort(rr, 1)[:, k], np.sort(ff, 1)[:, k]
    return dict(precision=(rf < r_rad[:, None]).any(0).mean(), recall=(rf < f_rad[None]).any(1).mean(),
                density=(rf < r_rad[:, None]).sum(0).mean() / k, coverage=(rf.min(1) < r_rad).mean())


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_prdc_equals_the_definition(seed):
    rng = np.random.default_rng(seed)
    real, fake = rng.normal(size=(150, 8)), rng.normal(size=(120, 8)) * 1.2 + 0.2
    got, want = prdc(real, fake, k=5, chunk=37), prdc_reference(real, fake, 5)
    for m in want: assert abs(got[m] - want[m]) < 1e-6, (m, got[m], want[m])


def test_prdc_equals_the_prdc_package():
    prdc_pkg = pytest.importorskip('prdc')
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(200, 16)).astype(np.float32), (rng.normal(size=(180, 16)) + 0.3).astype(np.float32)
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()): want = prdc_pkg.compute_prdc(real, fake, nearest_k=5)
    got = prdc(real, fake, k=5, chunk=64)
    for m in want: assert abs(got[m] - float(want[m])) < 1e-6, (m, got[m], want[m])


def test_nearest_neighbours_is_exact_in_every_chunking():
    rng = np.random.default_rng(4)
    Q, R = rng.normal(size=(91, 12)), rng.normal(size=(203, 12))
    D = np.linalg.norm(Q[:, None] - R[None], axis=-1)
    for chunk in (1, 7, 64, 4096):
        d, i = nearest_neighbours(Q, R, k=4, chunk=chunk)
        assert (i == np.argsort(D, 1)[:, :4]).all() and np.allclose(d, np.sort(D, 1)[:, :4], atol=1e-10)


def cli(*args, outputs):
    "`cxr-pggan ARGS` with `outputs` as the outputs folder (in-process unless CXR_PGGAN_TEST_SUBPROCESS=1: test_bad_inputs.cli)."
    from test_bad_inputs import cli as run
    return run(Path(outputs).parent, *args, env=dict(CXR_PGGAN_OUTPUTS=str(outputs)), timeout=300)


@pytest.fixture(scope='module')
def phantom_sets(tmp_path_factory):
    "600 phantom radiographs (128²) of real NIH rows split by patient into train / held-out / others, and genuine samples of a random GAN (32²)."
    from cxr_pggan.phantom import ensure_phantom
    from cxr_pggan.data import load_folder, write_splits
    from cxr_pggan.latent import random_networks
    from cxr_pggan.pggan import generate
    tmp = tmp_path_factory.mktemp('phantom_sets')
    folder = ensure_phantom(600, 128, 0)
    with warnings.catch_warnings():                                        # (a label with no positives in a split: irrelevant here)
        warnings.simplefilter('ignore'); write_splits(load_folder(folder), tmp / 'splits', (0.5, 0.3, 0.2), 0)
    splits = tmp / 'splits' / 'splits.csv'
    g, _ = random_networks(tmp / 'nets', 32)
    generate(g, 40, tmp / 'gan', seed=0)
    return dict(folder=folder, splits=splits, gan=sorted((tmp / 'gan').glob('*.png')),
                train=image_records(folder, 'train', splits), others=image_records(folder, 'test', splits))


@pytest.mark.parametrize('size', [32, 64, 128])
def test_planted_copies_are_found_and_other_patients_are_not(tmp_path, phantom_sets, size):
    """The proof: genuine GAN samples + planted near-copies (shifts up to ±5 % of the size, a quarter also turned 1.5–3°,
    ±5 % brightness, noise 2/255) + other patients' images, as a 32², 64² and 128² archive, audited at the defaults."""
    ps = phantom_sets
    truth = plant_copies(ps['train'], ps['others'], ps['gan'], tmp_path / 'archive', size, n_planted=60, seed=size)
    assert truth.loc[truth['kind'] == 'planted', ['dx', 'dy']].abs().max().max() > 0.04 * 128          # shifts reach the ±5 % edge
    assert (truth.loc[truth['kind'] == 'planted rotated', 'angle'].abs() >= 1.5).all()
    r = cli('audit', '--train', ps['folder'], '--holdout', ps['folder'], '--splits', ps['splits'], '--synthetic', tmp_path / 'archive',
            '--out', tmp_path / 'audit', outputs=tmp_path / 'outputs')
    assert r.returncode == 0, r.stderr[-2000:]
    assert '128×128' in r.stdout and (size == 128 or 'all brought to 32² grey' in r.stdout)           # the resolutions are stated
    flags = pd.read_csv(tmp_path / 'audit' / 'flags.csv')
    assert list(flags.columns[:6]) == ['Image Index', 'nearest', 'dcr', 'dcr_percentile', 'reid_score', 'flagged']
    rates = planted_rates(flags, truth).set_index('kind'); print(f'\n{size}²:\n{rates.to_string()}')   # shown with -s
    assert rates.loc['planted', 'images'] == 45 and rates.loc['planted rotated', 'images'] == 15 and rates.loc['other patient', 'images'] >= 100
    assert rates.loc['planted', 'share_flagged'] >= 0.95 and rates.loc['planted rotated', 'share_flagged'] >= 0.9, rates
    assert rates.loc['planted', 'nearest_is_source'] >= 0.95 and rates.loc['planted rotated', 'nearest_is_source'] >= 0.9, rates   # the right image
    assert rates.loc['other patient', 'share_flagged'] <= 0.05, rates
    rec = json.loads((tmp_path / 'audit' / 'audit.json').read_text())
    assert rec['settings']['quantile'] == 0.01 and rec['settings']['pixel_size'] == 32 and '128×128' in rec['space']
    assert rec['settings']['max_shift'] == 0.05 and rec['settings']['max_rotation'] == 3.0 and rec['holdout_false_flag_crossfit'] <= 0.05
    if size != 32: return
    # the release copy leaves out exactly the flagged images, and records the audit that cleared it
    r = cli('archive', '--exclude-flagged', tmp_path / 'audit' / 'flags.csv', '--out', tmp_path / 'release', outputs=tmp_path / 'outputs')
    assert r.returncode == 0, r.stderr[-2000:]
    rel = json.loads((tmp_path / 'release' / 'release.json').read_text())
    kept = {p.name for p in (tmp_path / 'release' / 'images').iterdir()}
    assert kept == set(flags.loc[~flags['flagged'], 'Image Index']) and rel['excluded'] == int(flags['flagged'].sum())
    assert rel['flags']['sha256'] == rec['flags_sha256'] and rel['audit']['settings'] == rec['settings']


def test_shortlist_recall_on_planted_copies(tmp_path, phantom_sets):
    """Stage 1 of the aligned DCR keeps the source of every planted copy in its shortlist (the fine stage can only find
    what the shortlist holds), and refining every training image instead gives the same DCR for the copies (checked on 10 of them)."""
    import torch
    from cxr_pggan.privacy import load_grey, prefilter, aligned_dcr
    ps = phantom_sets
    truth = plant_copies(ps['train'], ps['others'], ps['gan'][:0], tmp_path / 'archive', 64, n_planted=40, n_others=0, seed=7)
    T = load_grey(ps['train']['path'], 128); Tf = prefilter(T, 32)
    Q = load_grey([tmp_path / 'archive' / 'images' / n for n in truth['Image Index']], 32)
    src = ps['train'].reset_index(drop=True).reset_index().set_index('Image Index')['index'].reindex(truth['source']).to_numpy()
    r = aligned_dcr(Q, Tf, 128, 32, desc=None)
    rank = [list(row).index(s) if s in row else None for row, s in zip(r['shortlist'], src)]
    print('\nshortlist rank of each source:', rank)
    assert None not in rank and max(rank) <= 3, rank
    assert (r['index'] == src).all()
    k = 10                                       # every training image aligned finely, for a quarter of the copies (the costly part)
    full = aligned_dcr(Q[:k], Tf, 128, 32, shortlist=len(T), desc=None)
    assert np.allclose(full['dcr'], r['dcr'][:k], atol=1e-9) and (full['index'] == r['index'][:k]).all()


def _tiny_audit_sets(root):
    "Smooth random 'radiographs': 12 training and 12 held-out images of other patients (NIH names), 4 synthetic."
    import torch
    from PIL import Image
    from cxr_pggan.features import resize_to
    g = torch.Generator().manual_seed(0)
    x = (resize_to(torch.rand(28, 1, 6, 6, generator=g), 48)[:, 0].numpy() * 255).astype(np.uint8)
    for d, names in (('train', [f'{i:08d}_000.png' for i in range(12)]), ('holdout', [f'{i:08d}_000.png' for i in range(50, 62)]),
                     ('syn', [f's{i}.png' for i in range(4)])):
        (root / d).mkdir()
        for n in names: Image.fromarray(x[len(list(root.glob('*/*.png')))]).save(root / d / n)
    return root / 'train', root / 'holdout', root / 'syn'


def test_audit_stops_when_an_image_changes_while_it_is_read(tmp_path, monkeypatch):
    "The sha256 recorded for an image must be of the bytes scored: an image whose size/mtime changed during the audit stops it."
    import cxr_pggan.privacy as P
    tr, ho, syn = _tiny_audit_sets(tmp_path)
    seen = {}
    real_stat = P._stat
    def stat(p):                                            # the second look at s2.png sees another file
        seen[str(p)] = seen.get(str(p), 0) + 1
        st = real_stat(p)
        return (st[0] + 1, st[1]) if Path(p).name == 's2.png' and seen[str(p)] > 1 else st
    monkeypatch.setattr(P, '_stat', stat)
    with pytest.raises(OSError, match=r'--synthetic .*: 1 image\(s\) changed while the audit read them \(s2.png\)'):
        P.audit(tr, ho, syn, tmp_path / 'audit', pixel_size=16, prdc_k=2, verbose=False)
    assert not (tmp_path / 'audit' / 'flags.csv').exists()


def test_release_stops_when_an_image_changes_during_the_copy(tmp_path, monkeypatch):
    "Bytes that change between the check and the copy are not released: the copy is hashed again."
    import shutil as sh
    import cxr_pggan.privacy as P
    tr, ho, syn = _tiny_audit_sets(tmp_path)
    P.audit(tr, ho, syn, tmp_path / 'audit', pixel_size=16, prdc_k=2, verbose=False)
    real_copy = sh.copyfile
    def copy(src, dst):                                     # s1.png is rewritten by someone just as it is copied
        real_copy(src, dst)
        if Path(src).name == 's1.png': Path(dst).write_bytes(Path(dst).read_bytes() + b'x')
    monkeypatch.setattr(P.shutil, 'copyfile', copy)
    with pytest.raises(ValueError, match=r's1.png changed while the release was being copied'):
        P.release_archive(tmp_path / 'audit' / 'flags.csv', tmp_path / 'release')
    assert not (tmp_path / 'release' / 'images' / 's1.png').exists() and not (tmp_path / 'release' / 'release.json').exists()


def test_audit_config_keywords_and_cli_agree(tmp_path):
    "`audit(..., config=AuditConfig(...))`, the same knobs by keyword and `cxr-pggan audit` write the same flags.csv and audit.json (but the time)."
    import cxr_pggan.privacy as P
    tr, ho, syn = _tiny_audit_sets(tmp_path)
    P.audit(tr, ho, syn, tmp_path / 'kw', pixel_size=16, prdc_k=2, max_rotation=2.0, quantile=0.05, verbose=False)
    P.audit(tr, ho, syn, tmp_path / 'cfg', P.AuditConfig(pixel_size=16, prdc_k=2, max_rotation=2.0, quantile=0.05, verbose=False))
    r = cli('audit', '--train', tr, '--holdout', ho, '--synthetic', syn, '--out', tmp_path / 'cli', '--pixel-size', 16, '--prdc-k', 2,
            '--max-rotation', 2, '--quantile', 0.05, outputs=tmp_path / 'outputs')
    assert r.returncode == 0, r.stderr[-2000:]
    rec = lambda d: {k: v for k, v in json.loads((tmp_path / d / 'audit.json').read_text()).items() if k != 'seconds'}
    for d in ('cfg', 'cli'):
        assert (tmp_path / d / 'flags.csv').read_bytes() == (tmp_path / 'kw' / 'flags.csv').read_bytes() and rec(d) == rec('kw')
    with pytest.raises(ValueError, match=r'--quantile 0.7'): P.AuditConfig(quantile=0.7)
    with pytest.raises(TypeError, match='config must be an AuditConfig'): P.audit(tr, ho, syn, tmp_path / 'pos', 'pixels')   # knobs by name
