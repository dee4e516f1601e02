"""`cxr-pggan evaluate` on the phantom with two synthetic sets (one labelled, one not): the report's numbers equal those of
the individual verbs and functions on the same inputs; finished parts are reused; bad inputs give one line (through the
real CLI) or a skipped part with its reason."""
import json, shutil, warnings
from pathlib import Path

import numpy as np, pandas as pd, pytest
from PIL import Image

from test_bad_inputs import cli, one_error, tree

KNOBS = dict(fid_boot=2, ci_boot=50, kid_subsets=5, min_class_n=3, prdc_k=3, utility_epochs=1, utility_max_steps=1, pixel_size=16, grids=1, grid_size=4,
             pairs=2, display=32, eval_seed=0)


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    "The phantom (64 images, 64², split by patient), a common classifier trained on that split, and two synthetic sets of a random GAN."
    from cxr_pggan.phantom import ensure_phantom
    from cxr_pggan.data import LABELS, load_folder, load_splits, write_splits
    from cxr_pggan.classifier import fit_classifier
    from cxr_pggan.latent import random_networks
    from cxr_pggan.pggan import generate
    tmp = tmp_path_factory.mktemp('evaluate')
    real = ensure_phantom(64, 64, 0, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); splits = write_splits(load_folder(real), tmp / 'splits', (0.6, 0.15, 0.25), 0)
    clf = tmp / 'clf.pt'
    fit_classifier(load_splits(splits, load_folder(real)), clf, input_size=32, epochs=1, max_steps=1, n_boot=20, log=lambda *a: None,
                   inputs={'splits': splits})
    gan, _ = random_networks(tmp / 'nets', 64)
    generate(gan, 16, tmp / 'labelled' / 'images', seed=0, prefix='g')
    rows = pd.read_csv(next(Path(real).glob('Data_Entry_2017*.csv'))).head(16).copy()     # labels of real rows, synthetic patients
    rows['Image Index'] = sorted(p.name for p in (tmp / 'labelled' / 'images').glob('*.png'))
    rows['Patient ID'] = 90000 + np.arange(16) // 2
    rows.to_csv(tmp / 'labelled' / 'Data_Entry_2017.csv', index=False)
    generate(gan, 12, tmp / 'unlabelled', seed=1, prefix='u')
    (tmp / 'unlabelled' / 'latents.npy').unlink(missing_ok=True)
    return dict(tmp=tmp, real=Path(real), splits=splits, clf=clf, labelled=tmp / 'labelled', unlabelled=tmp / 'unlabelled', labels=LABELS)


@pytest.fixture(scope='module')
def report(ws):
    from cxr_pggan.evaluate import evaluate
    return evaluate(ws['real'], [ws['labelled'], ws['unlabelled']], ws['tmp'] / 'report', splits=ws['splits'], classifier=ws['clf'],
                    profile='smoke', allow_random_weights=True, cache=ws['tmp'] / 'report' / 'features', **KNOBS)


def test_fidelity_equals_the_fid_verb_and_prdc(ws, report, tmp_path):
    from cxr_pggan.fid import fid_cli
    from cxr_pggan.privacy import prdc
    from cxr_pggan.features import fid_inception, image_paths, set_features
    cache = ws['tmp'] / 'report' / 'features'                     # the report's per-image feature cache: the same features, not recomputed
    test = tmp_path / 'real_test.csv'                             # the verb's --split applies to both sets: the real test images as a CSV
    pd.DataFrame(dict(path=image_paths(ws['real'], split='test', splits=ws['splits']))).to_csv(test, index=False)
    ext = fid_inception(allow_random_weights=True)
    for name, folder in (('labelled', ws['labelled']), ('unlabelled', ws['unlabelled'])):
        out = tmp_path / f'{name}.json'
        fid_cli([str(x) for x in ['--real', test, '--fake', folder, '--allow-random-weights', '--classifier',
                 ws['clf'], '--metrics', 'fid,kid,fid_cxr,kid_cxr', '--kid-subsets', '5', '--json', out, '--cache', cache]])
        verb = json.loads(out.read_text())['metrics']
        got = report['results']['fidelity'][name]
        for k in ('FID', 'KID', 'KID_std', 'FID_CXR', 'KID_CXR'): assert got[k] == verb[k], (name, k, got[k], verb[k])
        assert got['n_real'] == json.loads(out.read_text())['n_real']
        fr, _ = set_features(test, ext, cache=cache / f"features-inception-{ext.meta['weights_sha256'][:12]}.npz")
        fs, _ = set_features(folder, ext, cache=cache / f"features-inception-{ext.meta['weights_sha256'][:12]}.npz")
        ref = prdc(fr, fs, KNOBS['prdc_k'])
        for k, v in ref.items(): assert got[f'prdc_{k}'] == v
    assert report['results']['fidelity']['labelled']['FID_ci_low'] <= report['results']['fidelity']['labelled']['FID_ci_high']


def test_labels_equal_one_classifier_and_the_bootstrap(ws, report):
    from cxr_pggan.prevalence import bootstrap_prevalence, classifier_labels
    from cxr_pggan.features import image_paths
    for name, files in (('real', image_paths(ws['real'], split='test', splits=ws['splits'])), ('unlabelled', image_paths(ws['unlabelled']))):
        t = bootstrap_prevalence(classifier_labels(str(ws['clf']), files), n_boot=KNOBS['ci_boot'], seed=0)
        got = pd.DataFrame(report['results']['labels'][name]['prevalence'])
        for c in ('prevalence', 'ci_low', 'ci_high'): assert got[c].tolist() == t[c].tolist(), (name, c)
    assert 'agreement' in report['results']['labels']['labelled'] and 'agreement' not in report['results']['labels']['unlabelled']


def test_utility_is_table2_of_its_predictions_and_skips_the_unlabelled_set(ws, report):
    from cxr_pggan.synthetic import table2
    u = report['results']['utility']['labelled']
    pred = pd.read_csv(u['predictions'])
    assert set(pred['model']) == {'real', 'labelled', 'real+labelled'}
    assert u['checkpoints']['real'] == str(ws['clf'])                        # trained on this split: reused as "real"
    t = table2(pred, n_boot=KNOBS['ci_boot'], seed=0, paper=None)
    got = pd.DataFrame(u['table'])
    for m in ('real', 'labelled', 'real+labelled'): assert np.array_equal(got[m].to_numpy(float), t[m].to_numpy(float), equal_nan=True), m
    assert 'unlabelled' not in report['results']['utility']
    assert report['parts']['utility']['skipped'] == ['utility (unlabelled): the synthetic set has no labels (no Data_Entry_2017*.csv), so no classifier can be trained on it']


def test_privacy_equals_the_audit_verb(ws, report, tmp_path):
    from cxr_pggan.privacy import audit_cli
    out = tmp_path / 'audit'
    audit_cli([str(x) for x in ['--train', ws['real'], '--holdout', ws['real'], '--splits', ws['splits'], '--synthetic', ws['labelled'], '--out', out,
               '--pixel-size', '16', '--prdc-k', '3']])
    verb = json.loads((out / 'audit.json').read_text())
    got = report['results']['privacy']['labelled']
    assert got['share_flagged'] == verb['share_flagged'] and got['prdc'] == verb['prdc'] and got['thresholds'] == verb['thresholds']
    a, b = pd.read_csv(out / 'flags.csv'), pd.read_csv(got['flags'])
    assert a['dcr'].tolist() == b['dcr'].tolist() and a['flagged'].tolist() == b['flagged'].tolist()


def test_report_layout_summary_and_readers(ws, report):
    out = ws['tmp'] / 'report'
    page = (out / 'report.html').read_text()
    for sec in ('summary', 'fidelity', 'labels', 'utility', 'privacy', 'readers'): assert f'<section id="{sec}">' in page
    assert "default-src 'none'" in page and 'http://' not in page.replace('http://127.0.0.1', '') and 'https://' not in page
    rec = json.loads((out / 'report.json').read_text())
    s = pd.DataFrame(rec['summary']).set_index('number')
    assert s.loc['FID (Inception)', 'labelled'] == report['results']['fidelity']['labelled']['FID']
    fids = {n: report['results']['fidelity'][n]['FID'] for n in ('labelled', 'unlabelled')}
    assert s.loc['FID (Inception)', 'best'] == min(fids, key=fids.get)
    for f in ('fidelity.csv', 'labels_prevalence.csv', 'utility_auc.csv', 'privacy.csv', 'readers.csv', 'summary.csv'): assert (out / f).is_file(), f
    assert any('biased upward' in w for w in report['results']['fidelity']['labelled']['warnings']) and 'biased upward' in page   # small N said
    r = report['results']['readers']['labelled']
    assert (Path(r['study']) / 'study.sqlite').is_file() and r['items'] == KNOBS['grids'] + KNOBS['pairs']


def test_rerun_reuses_every_part(ws, report, monkeypatch):
    import cxr_pggan.evaluate as ev
    def boom(*a, **k): raise AssertionError('recomputed a finished part')
    for f in ('fidelity_part', 'labels_part', 'utility_part', 'privacy_part', 'readers_part'): monkeypatch.setattr(ev, f, boom)
    again = ev.evaluate(ws['real'], [ws['labelled'], ws['unlabelled']], ws['tmp'] / 'report', splits=ws['splits'], classifier=ws['clf'],
                        profile='smoke', allow_random_weights=True, cache=ws['tmp'] / 'report' / 'features', **KNOBS)
    assert pd.DataFrame(again['summary']).equals(pd.DataFrame(report['summary']))


def test_a_study_written_just_before_a_kill_is_kept(ws, report, tmp_path):
    "Killed after the study's database was written but before its part was saved: the rerun keeps that study (never overwritten)."
    from cxr_pggan.evaluate import evaluate
    out = tmp_path / 'r'
    kw = dict(splits=ws['splits'], sections='readers', profile='smoke', **KNOBS)
    first = evaluate(ws['real'], [ws['unlabelled']], out, **kw)['results']['readers']['unlabelled']
    db = out / 'study' / 'unlabelled' / 'study.sqlite'; before = db.read_bytes()
    (out / 'parts' / 'readers__unlabelled.json').unlink()
    again = evaluate(ws['real'], [ws['unlabelled']], out, **kw)['results']['readers']['unlabelled']
    assert again['items'] == first['items'] and again['images'] == first['images'] and db.read_bytes() == before


def test_time_budget_stops_between_parts_and_a_rerun_continues(ws, tmp_path, monkeypatch):
    import time
    from cxr_pggan.evaluate import evaluate
    kw = dict(splits=ws['splits'], sections='fidelity,privacy', profile='smoke', allow_random_weights=True, cache=ws['tmp'] / 'report' / 'features', **KNOBS)
    monkeypatch.setenv('CXR_PGGAN_SESSION_START', str(time.time() - 3600))      # the session began an hour ago: 30 minutes are spent
    r = evaluate(ws['real'], [ws['unlabelled']], tmp_path / 'r', time_budget='30m', **kw)
    assert 'stopped by --time-budget 30m' in r['stopped'] and r['summary'] == [] and 'run the same command again' in r['stopped']
    monkeypatch.delenv('CXR_PGGAN_SESSION_START')
    r = evaluate(ws['real'], [ws['unlabelled']], tmp_path / 'r', time_budget='30m', **kw)
    assert r['stopped'] is None and r['results']['privacy']['unlabelled']['share_flagged'] >= 0


def test_different_resolutions_are_brought_to_one(ws, tmp_path):
    from cxr_pggan.evaluate import evaluate
    small = tmp_path / 'small'; small.mkdir()
    for i, p in enumerate(sorted(ws['unlabelled'].glob('*.png'))[:8]): Image.open(p).resize((16, 16)).save(small / f's{i}.png')
    r = evaluate(ws['real'], [small], tmp_path / 'r', splits=ws['splits'], sections='readers', profile='smoke', **KNOBS)
    assert r['resolution'] == 16 and 'brought to 16²' in r['resolution_note']
    assert 'brought to 16²' in (tmp_path / 'r' / 'report.html').read_text()


@pytest.fixture(scope='module')
def bad(ws, tmp_path_factory):
    b = tmp_path_factory.mktemp('bad')
    (b / 'one').mkdir(); shutil.copy(next(ws['unlabelled'].glob('*.png')), b / 'one' / 'x.png')
    shutil.copytree(ws['unlabelled'], b / 'copies')
    shutil.copy(next((ws['real'] / 'images').glob('*.png')) if (ws['real'] / 'images').is_dir() else next(ws['real'].rglob('*.png')), b / 'copies' / 'renamed.png')
    (b / 'nolabels').mkdir(); shutil.copy(next(ws['unlabelled'].glob('*.png')), b / 'nolabels' / 'a.png')
    (b / 'outputs').mkdir()
    return b


CASES = {
    'no labels in the real set': (lambda w, b: ['--real', b / 'nolabels', '--synthetic', w['unlabelled']], ['--real', 'no Data_Entry_2017', 'labels']),
    'one image': (lambda w, b: ['--real', w['real'], '--synthetic', b / 'one', '--splits', w['splits']], ['--synthetic', '1 image', 'at least 2']),
    'copies of real images': (lambda w, b: ['--real', w['real'], '--synthetic', b / 'copies', '--splits', w['splits']], ['--synthetic', 'byte-for-byte copies', 'renamed.png']),
    'unknown section': (lambda w, b: ['--real', w['real'], '--synthetic', w['unlabelled'], '--sections', 'fidelity,beauty'], ['--sections', 'beauty']),
    'bad time budget': (lambda w, b: ['--real', w['real'], '--synthetic', w['unlabelled'], '--time-budget', 'soon'], ['--time-budget', 'soon']),
}


@pytest.mark.parametrize('case', ['copies of real images'])
def test_bad_input_through_the_real_cli(ws, bad, tmp_path, case):
    "One case in a subprocess (exit status 2, one line, nothing changed); the others in-process below, through the same `cli.main`."
    args, needles = CASES[case]
    before = tree(ws['real']) | tree(ws['unlabelled'])
    r = cli(bad, 'evaluate', *args(ws, bad), '--out', tmp_path / 'out', '--profile', 'smoke', '--allow-random-weights')
    one_error(r, *needles)
    assert tree(ws['real']) | tree(ws['unlabelled']) == before


@pytest.mark.parametrize('case', [c for c in CASES if c != 'copies of real images'])
def test_bad_inputs_one_line(ws, bad, tmp_path, capsys, case):
    from cxr_pggan.cli import main
    args, needles = CASES[case]
    before = tree(ws['real']) | tree(ws['unlabelled'])
    assert main(['evaluate', *map(str, args(ws, bad)), '--out', str(tmp_path / 'out'), '--profile', 'smoke', '--allow-random-weights']) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith('cxr-pggan')]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), lines
    assert tree(ws['real']) | tree(ws['unlabelled']) == before


def test_a_foreign_report_folder_is_refused(ws, bad, tmp_path, capsys):
    from cxr_pggan.cli import main
    (tmp_path / 'out').mkdir(); (tmp_path / 'out' / 'mine.txt').write_text('mine')
    assert main(['evaluate', '--real', str(ws['real']), '--synthetic', str(ws['unlabelled']), '--out', str(tmp_path / 'out'), '--profile', 'smoke']) == 2
    assert 'not empty' in capsys.readouterr().err
    assert (tmp_path / 'out' / 'mine.txt').read_text() == 'mine'
