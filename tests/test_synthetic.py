"Tests of cxr_pggan.synthetic: Table 2 recomputed from its predictions file, paired differences, the encoder's resume and generator guard."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from sklearn.metrics import roc_auc_score

from cxr_pggan.data import LABELS
from cxr_pggan import synthetic as S
from cxr_pggan.latent import random_networks


def _test_frame(n=60, seed=0):
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, len(LABELS))) < 0.3).astype(int)
    Y[:, LABELS.index('Hernia')] = 0                             # a label without positives: AUC undefined, must stay NaN
    Y[:3, LABELS.index('Mass')] = 1; Y[3:, LABELS.index('Mass')] = 0   # 3 positives: an AUC but no CI
    return pd.DataFrame(Y, columns=LABELS).assign(**{'Image Index': [f'{i:08d}_000.png' for i in range(n)], 'Patient ID': np.arange(n)})


def _pred(test, seed=0, gains=(0.2, 0.6, 1.0, 2.5), models=S.COLUMNS):
    rng = np.random.default_rng(seed + 1)
    Y = test[LABELS].to_numpy()
    return S.predictions_frame(test, {m: Y * g + rng.normal(0, 1, Y.shape).astype(np.float32) for m, g in zip(models, gains)})


def test_every_auc_of_the_written_table_recomputes_with_sklearn():
    "The files as written: every AUC of table2_<p>.csv, all four columns, equals scikit-learn's on table2_<p>_predictions.csv."
    test = _test_frame()
    w = S.write_table2(_pred(test), 'pytest', n_boot=100, seed=0, note='random scores')
    pred = pd.read_csv(w['paths']['predictions'], dtype={'Image Index': str})
    tab = pd.read_csv(w['paths']['table']).set_index('label')
    assert list(pred.columns[:3]) == ['Image Index', 'Patient ID', 'model']
    assert list(pred.columns[3:18]) == LABELS and list(pred.columns[18:]) == [f'true_{l}' for l in LABELS]
    checked = 0
    assert sorted(pred.model.unique()) == sorted(S.COLUMNS) == sorted(S.MODELS + ('reconstruction',))
    for m in S.COLUMNS:
        q = pred[pred.model == m]
        assert len(q) == len(test)
        per_label = []
        for l in LABELS:
            y = q[f'true_{l}']
            if 0 < y.sum() < len(y):
                a = roc_auc_score(y, q[l]); per_label.append(a)
                assert abs(a - tab.loc[l, m]) < 1e-12, (m, l, a, tab.loc[l, m]); checked += 1
            else: assert np.isnan(tab.loc[l, m])
        assert abs(np.mean(per_label) - tab.loc['macro', m]) < 1e-12
        lo, hi = tab.loc['macro', f'{m}_ci_low'], tab.loc['macro', f'{m}_ci_high']
        assert lo <= tab.loc['macro', m] <= hi
        assert np.isnan(tab.loc['Mass', f'{m}_ci_low'])                  # fewer than 5 positives: no CI
    assert checked == 4 * 14
    assert np.isnan(tab.loc['macro', 'paper_reconstruction'])                 # the paper gives no AUC for it
    assert tab.loc['macro', 'paper_class_generated'] == 0.878 and tab[['paper_real']].iloc[:-1].isna().all().all()
    md = w['paths']['markdown'].read_text()
    assert 'macro mean AUC only' in md and 'holds here' in md and '| Reconstruction ' in md
    d = pd.read_csv(w['paths']['differences']).set_index('difference')           # paired differences against embedded and class_generated
    assert {'reconstruction - embedded', 'class_generated - reconstruction'} <= set(d.index)
    assert 'Reconstruction (no published AUC)' in w['sentence']
    for k in ('predictions', 'table', 'markdown', 'figure'): assert Path(str(w['paths'][k]) + '.provenance.json').is_file()


def test_paired_differences():
    test = _test_frame(80)
    pred = _pred(test, gains=(1.0, 1.0, 3.0), models=S.MODELS)
    same = pred[pred.model == 'embedded'].assign(model='class_generated')        # identical scores: difference exactly 0
    pred = pd.concat([pred[pred.model != 'class_generated'], same])
    d = S.paired_differences(pred, n_boot=200).set_index('difference')
    assert d.loc['class_generated - embedded', 'macro_auc_difference'] == 0
    assert d.loc['class_generated - embedded', 'ci_low'] == 0 == d.loc['class_generated - embedded', 'ci_high']
    r = d.loc['real - class_generated']
    assert r.macro_auc_difference > 0 and r.ci_low > 0 and bool(r.excludes_zero)
    t = S.table2(pred, n_boot=50)
    assert 'does NOT hold' in S.order_sentence(t, d.reset_index())          # embedded == class_generated: not strictly ordered


def test_other_images_are_refused():
    test = _test_frame(20)
    pred = _pred(test)
    bad = pred.copy(); bad.loc[bad.model == 'real', 'true_Mass'] = 1 - bad.loc[bad.model == 'real', 'true_Mass']
    with pytest.raises(ValueError, match='other true labels'): S.table2(bad)
    with pytest.raises(ValueError, match='other images'): S.table2(pred.iloc[1:])


def test_encoder_belongs_to_its_generator(tmp_path):
    g16, _ = random_networks(tmp_path / 'a', 16)
    g16b, _ = random_networks(tmp_path / 'b', 16, seed=1)                          # same shape, other weights
    S.train_encoder(g16, tmp_path / 'e.pt', steps=2, batch_size=4, heldout=4, eval_every=1, checkpoint_every=1, log=lambda *a: None)
    with pytest.raises(ValueError, match='not .*sha256'): S.load_encoder(tmp_path / 'e.pt', g16b)
    S.load_encoder(tmp_path / 'e.pt', g16b, allow_other_generator=True)
    with pytest.raises(ValueError, match='other settings'):
        S.train_encoder(g16, tmp_path / 'e.pt', steps=4, batch_size=8, heldout=4, log=lambda *a: None)
    r = S.train_encoder(g16, tmp_path / 'e.pt', steps=4, batch_size=4, heldout=4, eval_every=1, checkpoint_every=1, log=lambda *a: None)
    assert r['steps'] == 4 and [h['step'] for h in r['history']] == [1, 2, 3, 4]     # continued, not restarted


@pytest.mark.slow
def test_train_encoder_survives_kill_9(tmp_path):
    "A real SIGKILL during `cxr-pggan train-encoder`, then the same command: it finishes with the uninterrupted run's weights."
    g, _ = random_networks(tmp_path / 'n', 16)
    env = dict(os.environ, TQDM_DISABLE='1', OMP_NUM_THREADS='1')
    args = [sys.executable, '-m', 'cxr_pggan', 'train-encoder', '--generator', str(g), '--profile', 'smoke',
            '--set', 'encoder_steps=4000', '--set', 'encoder_eval_every=500']
    assert subprocess.run(args + ['--out', str(tmp_path / 'ref.pt')], env=env, capture_output=True).returncode == 0
    p = subprocess.Popen(args + ['--out', str(tmp_path / 'k.pt')], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (tmp_path / 'k.pt').is_file() and time.time() - t0 < 120: time.sleep(0.05)
    time.sleep(0.3); p.send_signal(signal.SIGKILL); p.wait()
    assert S.read_encoder_checkpoint(tmp_path / 'k.pt')['step'] < 4000
    r = subprocess.run(args + ['--out', str(tmp_path / 'k.pt')], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and 'resuming' in r.stdout, r.stderr[-1000:]
    a, b = S.read_encoder_checkpoint(tmp_path / 'ref.pt'), S.read_encoder_checkpoint(tmp_path / 'k.pt')
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict'])
