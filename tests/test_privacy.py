"""The privacy audit: exact search and PRDC against references, and the proof on planted copies (phantom, where the
truth is known): at its default settings the audit flags >= 95 % of planted near-copies of training images and
<= 5 % of real images of other patients."""
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
    env = dict(os.environ, TQDM_DISABLE='1', MPLBACKEND='Agg', CXR_PGGAN_OUTPUTS=str(outputs), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'cxr_pggan', *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_planted_copies_are_found_and_other_patients_are_not(tmp_path):
    "The proof of item 3: genuine GAN samples + planted near-copies + other patients' images, audited at the defaults."
    from cxr_pggan.phantom import ensure_phantom
    from cxr_pggan.data import load_folder, write_splits
    from cxr_pggan.latent import random_networks
    from cxr_pggan.pggan import generate
    folder = ensure_phantom(600, 128, 0)                                   # 600 phantom radiographs of real NIH rows, 128²
    df = load_folder(folder)
    with warnings.catch_warnings():                                        # (a label with no positives in a split: irrelevant here)
        warnings.simplefilter('ignore'); write_splits(df, tmp_path / 'splits', (0.5, 0.3, 0.2), 0)   # patients: train / held-out / others
    splits = tmp_path / 'splits' / 'splits.csv'
    g, _ = random_networks(tmp_path / 'nets', 32)
    generate(g, 40, tmp_path / 'gan', seed=0)                              # genuine samples of a (random) GAN, 32²
    tr, ev = image_records(folder, 'train', splits), image_records(folder, 'test', splits)
    truth = plant_copies(tr, ev, sorted((tmp_path / 'gan').glob('*.png')), tmp_path / 'archive', 32, n_planted=60, seed=0)
    r = cli('audit', '--train', folder, '--holdout', folder, '--splits', splits, '--synthetic', tmp_path / 'archive',
            '--out', tmp_path / 'audit', outputs=tmp_path / 'outputs')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'all brought to 32² grey' in r.stdout and '128×128' in r.stdout                 # the resolutions are stated
    flags = pd.read_csv(tmp_path / 'audit' / 'flags.csv')
    assert list(flags.columns[:6]) == ['Image Index', 'nearest', 'dcr', 'dcr_percentile', 'reid_score', 'flagged']
    rates = planted_rates(flags, truth).set_index('kind'); print(rates.to_string())   # shown with -s
    assert rates.loc['planted', 'share_flagged'] >= 0.95, rates
    assert rates.loc['other patient', 'share_flagged'] <= 0.05, rates
    assert rates.loc['other patient', 'images'] >= 100 and rates.loc['planted', 'images'] == 60
    assert rates.loc['planted', 'nearest_is_source'] >= 0.95, rates                        # and it names the right training image
    rec = json.loads((tmp_path / 'audit' / 'audit.json').read_text())
    assert rec['settings']['quantile'] == 0.01 and rec['settings']['pixel_size'] == 32 and '128×128' in rec['space']
    # the release copy leaves out exactly the flagged images, and records the audit that cleared it
    r = cli('archive', '--exclude-flagged', tmp_path / 'audit' / 'flags.csv', '--out', tmp_path / 'release', outputs=tmp_path / 'outputs')
    assert r.returncode == 0, r.stderr[-2000:]
    rel = json.loads((tmp_path / 'release' / 'release.json').read_text())
    kept = {p.name for p in (tmp_path / 'release' / 'images').iterdir()}
    assert kept == set(flags.loc[~flags['flagged'], 'Image Index']) and rel['excluded'] == int(flags['flagged'].sum())
    assert rel['flags']['sha256'] == rec['flags_sha256'] and rel['audit']['settings'] == rec['settings']
