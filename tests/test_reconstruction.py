"""Reconstruction-loss embedding (`cxr-pggan embed --method reconstruction`): kill and rerun gives the uninterrupted
result, names/patients/labels are kept, and every bad input is one line through the real command line, changing nothing."""
import json
from pathlib import Path

import numpy as np, pandas as pd, pytest

from cxr_pggan import synthetic as S
from cxr_pggan.data import LABELS, load_folder
from cxr_pggan.latent import random_networks
from test_bad_inputs import cli, one_error, tree, _png


@pytest.fixture(scope='module')
def rws(tmp_path_factory):
    "Random 16² networks, a 10-image NIH-layout folder (5 patients) and a folder whose metadata lists images that are not there."
    ws = tmp_path_factory.mktemp('rws')
    rng = np.random.default_rng(0)
    rows, labels = [], ['No Finding', 'Cardiomegaly', 'Effusion|Mass', 'No Finding', 'Hernia'] * 2
    for i in range(10):
        name = f'{i // 2:08d}_{i % 2:03d}.png'
        _png(ws / 'user' / 'images' / name, (rng.random((24, 24)) * 255).astype(np.uint8))
        rows.append({'Image Index': name, 'Finding Labels': labels[i], 'Follow-up #': i % 2, 'Patient ID': i // 2,
                     'Patient Age': 40 + i, 'Patient Gender': 'MF'[i % 2], 'View Position': 'PA'})
    pd.DataFrame(rows).to_csv(ws / 'user' / 'Data_Entry_2017.csv', index=False)
    (ws / 'noimages').mkdir(); pd.DataFrame(rows).to_csv(ws / 'noimages' / 'Data_Entry_2017.csv', index=False)
    gan, clf = random_networks(ws / 'nets', 16)
    return dict(root=ws, user=ws / 'user', noimages=ws / 'noimages', gan=gan, clf=clf)


class _Kill(Exception): pass


def _kill_after(batch):
    def cb(b):
        if b == batch: raise _Kill()
    return cb


def test_kill_and_rerun_gives_the_uninterrupted_result(rws, tmp_path):
    "Stopped after its first batch and run again, a reconstruction writes the same latents and PNGs as one that ran through."
    kw = dict(steps=3, lr=0.1, restarts=2, batch_size=4, seed=1, pixel_weight=1.0, feature_weight=0.05, features='classifier', classifier=rws['clf'])
    ref = S.reconstruct_images(rws['gan'], rws['user'], tmp_path / 'ref', **kw)
    with pytest.raises(_Kill): S.reconstruct_images(rws['gan'], rws['user'], tmp_path / 'k', callbacks=[_kill_after(0)], **kw)
    assert not (tmp_path / 'k' / 'latents.npy').exists() and (tmp_path / 'k' / 'latents' / 'batch_000000.pt').is_file()
    r = S.reconstruct_images(rws['gan'], rws['user'], tmp_path / 'k', **kw)
    assert (ref['written_this_run'], r['written_this_run']) == (10, 6)                  # the two unfinished batches only
    assert np.array_equal(np.load(tmp_path / 'ref' / 'latents.npy'), np.load(tmp_path / 'k' / 'latents.npy'))
    a, b = tree(tmp_path / 'ref' / 'images'), tree(tmp_path / 'k' / 'images')
    assert [v for _, v in sorted(a.items())] == [v for _, v in sorted(b.items())] and len(a) == 10
    assert r['loss'] == pytest.approx(ref['loss']) and r['loss'] <= r['start_loss']
    emb, real = load_folder(tmp_path / 'k'), load_folder(rws['user'])             # names, patients, labels as the real images
    assert list(emb['Image Index']) == list(real['Image Index']) and list(emb['Patient ID']) == list(real['Patient ID'])
    assert np.array_equal(emb[LABELS].to_numpy(), real[LABELS].to_numpy())
    man = json.loads((tmp_path / 'k' / 'embed.json').read_text())
    assert man['method'] == 'reconstruction' and man['settings']['steps'] == 3 and man['timing']['seconds'] > 0


def test_reconstruction_from_the_encoder_is_no_worse_than_the_encoder(rws, tmp_path):
    "Started at E(x), the reconstruction keeps the best latent it saw: every image's loss is at most the encoder's."
    enc = tmp_path / 'e.pt'
    S.train_encoder(rws['gan'], enc, steps=4, batch_size=4, heldout=4, eval_every=2, checkpoint_every=2, log=lambda *a: None)
    r = S.reconstruct_images(rws['gan'], rws['user'], tmp_path / 'r', encoder=enc, steps=4, lr=0.1, batch_size=5)
    recs = [__import__('torch').load(p, weights_only=True) for p in sorted((tmp_path / 'r' / 'latents').iterdir())]
    for rec in recs: assert (rec['loss'] <= rec['start_loss']).all()
    assert r['loss'] < r['start_loss']
    assert json.loads((tmp_path / 'r' / 'embed.json').read_text())['settings']['start'] == 'encoder'


@pytest.mark.parametrize('case', ['unknown method', 'encoder without --encoder', 'no images', 'negative weight', 'both weights 0',
                                  'features without a classifier'])
def test_bad_inputs_are_one_line(rws, tmp_path, case):
    "Each bad input of `embed`: exit status 2, one line naming the option or file and the fix; no file is written or changed."
    base = ['embed', '--generator', rws['gan'], '--data', rws['user'], '--out', tmp_path / 'out', '--profile', 'smoke']
    rec = base + ['--method', 'reconstruction']
    argv, needles = {
        'unknown method': (base + ['--method', 'optimise'], ["--method", "invalid choice: 'optimise'"]),
        'encoder without --encoder': (base, ['--method encoder needs --encoder', 'cxr-pggan train-encoder']),
        'no images': (['embed', '--method', 'reconstruction', '--generator', rws['gan'], '--data', rws['noimages'], '--out', tmp_path / 'out'],
                      [str(rws['noimages']), '10 of 10 images listed in the metadata are missing']),
        'negative weight': (rec + ['--set', 'recon_feature_weight=-1'], ['recon_feature_weight must be a finite number >= 0, got -1']),
        'both weights 0': (rec + ['--set', 'recon_pixel_weight=0', '--set', 'recon_feature_weight=0'], ['both 0', 'recon_pixel_weight=1']),
        'features without a classifier': (rec, ["recon_features 'classifier'", '--classifier C.pt', 'recon_feature_weight=0']),
    }[case]
    before = tree(rws['root'])
    one_error(cli(rws['root'], *argv), *needles)
    assert tree(rws['root']) == before and not (tmp_path / 'out').exists()


def test_resuming_with_other_settings_is_refused(rws, tmp_path):
    "A folder reconstructed with other settings is named with the difference and the way out; nothing in it changes."
    out = tmp_path / 'out'
    S.reconstruct_images(rws['gan'], rws['user'], out, steps=2, restarts=2, batch_size=5)
    before = tree(out)
    one_error(cli(rws['root'], 'embed', '--method', 'reconstruction', '--generator', rws['gan'], '--data', rws['user'], '--out', out,
                  '--profile', 'smoke', '--set', 'recon_feature_weight=0', '--set', 'recon_steps=2', '--batch', '5', '--seed', '0',
                  '--set', 'recon_restarts=2', '--set', 'recon_lr=0.5'),
              str(out / 'embed.json'), 'settings', 'use a new --out folder')
    assert tree(out) == before


@pytest.mark.slow
def test_embed_reconstruction_survives_kill_9(rws, tmp_path):
    "A real SIGKILL during `cxr-pggan embed --method reconstruction`, then the same command: the uninterrupted run's latents and PNGs."
    import os, signal, subprocess, sys, time
    env = dict(os.environ, TQDM_DISABLE='1', OMP_NUM_THREADS='1', CXR_PGGAN_OUTPUTS=str(tmp_path / 'outputs'))
    args = [sys.executable, '-m', 'cxr_pggan', 'embed', '--method', 'reconstruction', '--generator', str(rws['gan']), '--data', str(rws['user']),
            '--profile', 'smoke', '--set', 'recon_feature_weight=0', '--set', 'recon_steps=400', '--batch', '2']
    assert subprocess.run(args + ['--out', str(tmp_path / 'ref')], env=env, capture_output=True).returncode == 0
    p = subprocess.Popen(args + ['--out', str(tmp_path / 'k')], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (tmp_path / 'k' / 'latents' / 'batch_000000.pt').is_file() and time.time() - t0 < 300: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (tmp_path / 'k' / 'latents.npy').exists()                                # killed before the end
    r = subprocess.run(args + ['--out', str(tmp_path / 'k')], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1000:]
    assert json.loads(r.stdout.splitlines()[-1])['written_this_run'] < 10
    assert np.array_equal(np.load(tmp_path / 'ref' / 'latents.npy'), np.load(tmp_path / 'k' / 'latents.npy'))
    assert [v for _, v in sorted(tree(tmp_path / 'ref' / 'images').items())] == [v for _, v in sorted(tree(tmp_path / 'k' / 'images').items())]
