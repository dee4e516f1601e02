"""The batched archive builder: a patient's result does not depend on the patients sharing its batch, a SIGKILLed run
resumes to the same bytes, targets that never converge stop it with the reason, label sets fall back to single labels,
and bad options give one line (through the real command line)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np, pandas as pd, pytest, torch

from cxr_pggan import archive as A
from cxr_pggan.classifier import load_classifier, save_classifier
from cxr_pggan.core import TimeBudget
from cxr_pggan.latent import random_networks
from cxr_pggan.cli import main
from test_bad_inputs import cli, one_error, tree

CPU = torch.device('cpu')


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    return random_networks(tmp_path_factory.mktemp('nets'), resolution=16)


def _files(d: Path) -> dict:
    "Every file the archive writes, by relative path (provenance and the folder's owner file left out: they hold times)."
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob('*')
            if p.is_file() and not p.name.startswith('.') and not p.name.endswith('.provenance.json')}


def test_patient_does_not_depend_on_its_batch(tmp_path, nets):
    "Patient 2 written alone (its own run, nobody else in the slots) is byte-identical to patient 2 written among all the others."
    gp, cp = nets
    cfg = A.ArchiveConfig(steps=6, seed=5, builder='batched', slots=4, candidates=2, max_attempts=2, report_every=3600)
    A.build_archive(gp, cp, 14, tmp_path / 'all', config=cfg)
    out = tmp_path / 'alone'
    rank, world, _ = A.open_archive_folder(out, 14, cfg)
    G, clf = A.archive_networks(gp, cp, CPU)
    plan, prev = A.archive_plan(out, 14, G, clf, cp, cfg, CPU, rank, world)
    state = A.resume_state(out, plan, rank, world); state.todo = [2]
    A.generate_patients_batched(G, clf, out, plan, prev, state, cfg, CPU, TimeBudget(None), rank, world)
    whole, alone = _files(tmp_path / 'all'), _files(out)
    mine = [f for f in alone if f.startswith(('records/', 'images/'))]
    assert sorted(mine) == ['images/' + r['name'] for r in json.loads(alone['records/00000002.json'])['images']] + ['records/00000002.json']
    assert all(alone[f] == whole[f] for f in mine) and alone['targets.json'] == whole['targets.json']


def test_kill_9_resume_is_byte_identical(tmp_path, nets):
    "A real SIGKILL mid-run, then the same command: images, labels, CSV and plan are the same, byte for byte, as one never interrupted; a record's z* within 1e-5 (a row's last bits can depend on the slot it ran in)."
    gp, cp = nets
    args = lambda out: ['archive', '--generator', gp, '--classifier', cp, '--n', 20, '--steps', 5, '--builder', 'batched', '--slots', 4, '--candidates', 2,
                        '--seed', 1, '--out', out]
    assert main([str(a) for a in args(tmp_path / 'whole')]) == 0           # in this process: the same code as the command
    out = tmp_path / 'killed'
    e = dict(os.environ, TQDM_DISABLE='1', CXR_PGGAN_OUTPUTS=str(tmp_path / 'outputs'), OMP_NUM_THREADS='1')
    p = subprocess.Popen([sys.executable, '-m', 'cxr_pggan', *map(str, args(out))], env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()                                # no wall-clock verdict: a loaded machine only makes this wait longer
    while time.time() - t0 < 600 and p.poll() is None and len(list((out / 'records').glob('[!.]*.json'))) < 2: time.sleep(0.05)
    assert p.poll() is None, 'the run ended before it could be killed: make it longer'
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (out / A.CSV_NAME).exists()
    r = cli(tmp_path, *args(out))
    assert r.returncode == 0, r.stderr[-2000:]
    whole, resumed = _files(tmp_path / 'whole'), _files(out)
    assert sorted(whole) == sorted(resumed) and len([f for f in whole if f.endswith('.png')]) == 20
    differ = [f for f in whole if whole[f] != resumed[f]]
    assert [f for f in differ if not (f.startswith('records/') and f.endswith('.json'))] == []      # images, CSV, plan: byte for byte
    for f in differ:                        # a record's z* may differ in its last bits: a row's rounding can depend on its slot
        a, b = (json.loads((d / f).read_text()) for d in (tmp_path / 'whole', out))
        assert {k: v for k, v in a.items() if k != 'z_star'} == {k: v for k, v in b.items() if k != 'z_star'}, f
        np.testing.assert_allclose(a['z_star'], b['z_star'], rtol=0, atol=1e-5)


def test_targets_that_never_converge_stop_with_the_reason(tmp_path, nets):
    "Thresholds no image reaches: exit 2 and one line naming the targets, the work, the thresholds, the AUCs' source and what to change."
    gp, cp = nets
    clf = load_classifier(cp); clf.thresholds.fill_(1e6)
    never = save_classifier(clf, tmp_path / 'never.pt')
    line = one_error(cli(tmp_path, 'archive', '--generator', gp, '--classifier', never, '--n', 3, '--steps', 2, '--candidates', 1,
                         '--max-attempts', 1, '--builder', 'batched', '--slots', 4, '--out', tmp_path / 'arch'),
                     'no target converges', '1 attempt(s) of 1 candidate latent(s) x 2 step(s)', "'Hernia': 1000000.0", 'AUC', '--steps')
    assert not (tmp_path / 'arch' / 'targets.json').exists()


def test_label_sets_fall_back_to_single_labels(tmp_path, nets, capsys):
    "Every finding always above its threshold: no label set can be exact, so the archive falls back to single labels (and says so)."
    gp, cp = nets
    clf = load_classifier(cp); clf.thresholds.fill_(-1e6)
    always = save_classifier(clf, tmp_path / 'always.pt')
    assert main(['archive', '--generator', str(gp), '--classifier', str(always), '--n', '6', '--steps', '2', '--candidates', '2',
                 '--max-attempts', '1', '--builder', 'batched', '--slots', '4', '--out', str(tmp_path / 'arch')]) == 0
    assert 'falling back to single-label targets' in capsys.readouterr().out
    tg = json.loads((tmp_path / 'arch' / 'targets.json').read_text())
    assert tg['exclusive'] is False and 'No Finding' not in tg['schedule'] and len(tg['schedule']) == len(json.loads((tmp_path / 'arch' / 'archive.json').read_text())['patients'])
    meta = pd.read_csv(tmp_path / 'arch' / A.CSV_NAME)
    assert len(meta) == 6 and all(t in labs.split('|') for t, labs in zip(meta['Target Class'], meta['Finding Labels']))


@pytest.mark.parametrize('case', ['builder', 'bench_missing'])
def test_bad_options(tmp_path, nets, case):
    gp, cp = nets
    before = tree(cp)
    argv, needles = dict(
        builder=(['archive', '--generator', gp, '--classifier', cp, '--n', 3, '--out', tmp_path / 'a', '--builder', 'fast'], ['--builder', 'fast']),
        bench_missing=(['bench', 'archive', '--generator', tmp_path / 'no.pt', '--classifier', cp], ['no.pt', 'no such checkpoint']))[case]
    one_error(cli(tmp_path, *argv), *needles)
    assert tree(cp) == before and not (tmp_path / 'a').exists()


def test_time_budget_stops_cleanly_and_the_rerun_finishes(tmp_path, nets):
    "A budget already spent: no patient is started, the summary says how to resume, and the same call without it finishes the archive."
    gp, cp = nets
    kw = dict(steps=4, seed=2, builder='batched', slots=4, candidates=2, max_attempts=2, report_every=3600)
    s = A.build_archive(gp, cp, 8, tmp_path / 'b', time_budget=1e-9, **kw)
    assert s['stopped'] and s['written_this_run'] == 0 and 'resume' in s['resume_hint'] and not (tmp_path / 'b' / A.CSV_NAME).exists()
    s = A.build_archive(gp, cp, 8, tmp_path / 'b', **kw)
    assert s['complete'] and s['images'] == 8
