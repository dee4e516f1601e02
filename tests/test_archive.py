"Tests of cxr_pggan.archive: exact count, NIH layout, labels from disk, resume after SIGKILL, sharding, settings guard."
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch

from cxr_pggan.data import LABELS, load_metadata, find_images, read_image
from cxr_pggan import archive as A
from cxr_pggan.classifier import load_classifier
from cxr_pggan.latent import random_networks
from cxr_pggan.core import OWNER_FILE


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    return random_networks(tmp_path_factory.mktemp('nets'), resolution=16)


@pytest.fixture(scope='module')
def ref_csv(tmp_path_factory):
    "A small reference metadata file (the real NIH rows shipped in ../shared would do too; this one needs nothing)."
    p = tmp_path_factory.mktemp('ref') / 'ref.csv'
    labs = ['No Finding'] * 6 + ['Cardiomegaly', 'Effusion|Cardiomegaly', 'Atelectasis', 'Hernia']
    pd.DataFrame({'Image Index': [f'{i:08d}_000.png' for i in range(10)], 'Finding Labels': labs, 'Follow-up #': 0,
                  'Patient ID': range(10), 'Patient Age': 40, 'Patient Sex': 'M', 'View Position': 'PA'}).to_csv(p, index=False)
    return p


def _check_archive(out: Path, n: int, clf_path: Path):
    meta = load_metadata(out / A.CSV_NAME)
    pngs = sorted(p.name for p in (out / 'images').iterdir())
    assert len(meta) == n and pngs == sorted(meta['Image Index']), (len(meta), len(pngs))
    assert not meta['Image Index'].duplicated().any()
    assert not [p for p in out.rglob('*') if p.name.startswith('.') and p.name != OWNER_FILE], 'temporary files left'
    assert len(find_images(meta, out)) == n
    # every PNG decodes; labels are the classifier's at its thresholds on the file as written
    clf = load_classifier(clf_path)
    x = torch.stack([torch.from_numpy(read_image(out / 'images' / nm))[None] for nm in meta['Image Index']])
    with torch.no_grad(): labs = A.final_labels(clf(x), clf.thresholds)
    assert labs == meta['Finding Labels'].tolist()
    # follow-ups of a patient are 0..k-1 with 1 <= k <= 6
    for pid, g in meta.groupby('Patient ID'):
        assert sorted(g['Follow-up #']) == list(range(len(g))) and 1 <= len(g) <= 6
    return meta


def test_build_exact_n_and_layout(tmp_path, nets, ref_csv):
    gp, cp = nets
    s = A.build_archive(gp, cp, 13, tmp_path / 'a', reference=ref_csv, steps=8, seed=1)
    assert s['complete'] and s['images'] == 13
    meta = _check_archive(tmp_path / 'a', 13, cp)
    plan = json.loads((tmp_path / 'a' / 'archive.json').read_text())
    assert sum(plan['patients']) == 13 and plan['reference_prevalence']['No Finding'] == 0.6
    t = pd.read_csv(tmp_path / 'a' / 'prevalence.csv')
    assert list(t.label) == LABELS and {'reference', 'archive', 'abs_diff', 'within_tolerance'} <= set(t.columns)
    prov = json.loads((tmp_path / 'a' / (A.CSV_NAME + '.provenance.json')).read_text())
    assert prov['pretrained_weights']['classifier']['sha256'] and prov['pretrained_weights']['generator']['sha256']
    # the target class of the first patient is the reference's most common label
    recs = A._load_records(tmp_path / 'a' / 'records')
    assert recs[0]['target'] == 'No Finding' or 'No Finding' in recs[0]['dropped_classes']
    # each patient's z* (follow-up 0) carries its target label (accepted only then)
    for r in recs.values():
        labs = r['images'][0]['labels'].split('|')
        assert labs == r['target'].split('|'), r             # exclusive (the default): exactly the target label set
    with pytest.raises(ValueError, match='other settings'): A.build_archive(gp, cp, 13, tmp_path / 'a', reference=ref_csv, seed=2)


def test_deficit_choice_tracks_reference():
    prev = pd.Series(0.0, index=LABELS); prev[['No Finding', 'Cardiomegaly', 'Hernia']] = [0.5, 0.3, 0.2]
    counts, n, picks = pd.Series(0.0, index=LABELS), 0, []
    for _ in range(100):
        c = A.choose_class(prev, counts, n, 1, LABELS); picks.append(c); counts[c] += 1; n += 1
    assert abs(picks.count('No Finding') - 50) <= 1 and abs(picks.count('Cardiomegaly') - 30) <= 1 and abs(picks.count('Hernia') - 20) <= 1


def test_gap_steers_local_samples_and_labels_match_disk(tmp_path, nets):
    "With a gap preferring fewer findings, the written patient has no more findings than the first draws; labels are the disk's."
    from cxr_pggan.pggan import as_image_generator
    gp, cp = nets
    G, clf = as_image_generator(gp), load_classifier(cp).eval()
    nfind = lambda labs: sum(0 if l == 'No Finding' else len(l.split('|')) for l in labs)
    recs = {}
    for name, gap in (('first', None), ('steered', lambda labs: float(nfind(labs)))):
        (tmp_path / name / 'images').mkdir(parents=True)
        recs[name] = A.make_patient(G, clf, tmp_path / name, 0, 5, 'Cardiomegaly', 0, steps=20, lr=0.05, candidates=6,
                                    max_attempts=3, sigma=0.2, jitter=False, device='cpu', gap=gap)
        assert recs[name] is not None and 'Cardiomegaly' in recs[name]['images'][0]['labels'].split('|')
        names = sorted(p.name for p in (tmp_path / name / 'images').iterdir())
        assert names == [f'00000000_{i:03d}.png' for i in range(5)]
        x = torch.stack([torch.from_numpy(read_image(tmp_path / name / 'images' / nm))[None] for nm in names])
        with torch.no_grad(): assert A.final_labels(clf(x), clf.thresholds) == [im['labels'] for im in recs[name]['images']]
    assert nfind([im['labels'] for im in recs['steered']['images']]) <= nfind([im['labels'] for im in recs['first']['images']])


def test_exclusive_patient_has_exactly_its_label_set(tmp_path, nets):
    from cxr_pggan.pggan import as_image_generator
    gp, cp = nets
    G, clf = as_image_generator(gp), load_classifier(cp).eval()
    (tmp_path / 'images').mkdir()
    rec = A.make_patient(G, clf, tmp_path, 0, 3, 'No Finding', 0, steps=60, lr=0.05, candidates=8, max_attempts=3,
                         sigma=0.2, jitter=False, device='cpu', exclusive=True)
    if rec is None: pytest.skip('random networks: no latent without findings in 24 tries')
    assert rec['target'] == 'No Finding' and rec['images'][0]['labels'] == 'No Finding'


def test_label_gap():
    prev = pd.Series(0.0, index=LABELS); prev[['No Finding', 'Cardiomegaly']] = [0.5, 0.5]
    c = pd.Series(0.0, index=LABELS)
    assert A.label_gap(prev, c, 0, ['No Finding', 'Cardiomegaly']) == 0.0
    assert A.label_gap(prev, c, 0, ['Cardiomegaly|Effusion', 'No Finding']) == pytest.approx(0.5)
    assert A.label_gap(prev, c, 0, ['Cardiomegaly', 'Cardiomegaly']) == pytest.approx(1.0)


def test_reference_combos_and_target_choice():
    ref = pd.DataFrame({'Finding Labels': ['No Finding'] * 5 + ['Mass|Effusion'] * 3 + ['Hernia'] * 2})
    v = A.reference_combos(ref)
    assert list(v.index) == ['No Finding', 'Effusion|Mass', 'Hernia'] and v.iloc[0] == 0.5
    prev = pd.Series(0.0, index=LABELS)
    prev[['No Finding', 'Effusion', 'Mass', 'Hernia']] = [0.5, 0.3, 0.3, 0.2]
    c = pd.Series(0.0, index=LABELS)
    assert A.choose_target(prev, c, 0, 4, list(v.index)) == 'No Finding'
    c['No Finding'] = 6
    assert A.choose_target(prev, c, 6, 4, list(v.index)) == 'Effusion|Mass'


def _run(args, env=None):
    code = 'import sys; from cxr_pggan.archive import archive_cli; sys.exit(archive_cli(sys.argv[1:]))'
    return subprocess.Popen([sys.executable, '-c', code, *map(str, args)], env={**os.environ, 'TQDM_DISABLE': '1', **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_resume_after_sigkill(tmp_path, nets, ref_csv):
    gp, cp = nets
    out, n = tmp_path / 'k', 80
    args = ['--generator', gp, '--classifier', cp, '--n', n, '--out', out, '--reference', ref_csv, '--steps', 8, '--seed', 3]
    for wait_records in (1, 4):                   # kill twice, at different points
        p = _run(args)
        t0 = time.time()
        while time.time() - t0 < 120:
            if len(list((out / 'records').glob('*.json'))) >= wait_records if (out / 'records').exists() else False: break
            if p.poll() is not None: break
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL); p.wait()
        assert p.returncode == -signal.SIGKILL, f'finished before it could be killed: {p.communicate()[0][-2000:]}'
    assert not (out / A.CSV_NAME).exists()       # no CSV while incomplete
    # what a kill in the middle of writing leaves: a temp file, and PNGs of a patient without a record
    (out / 'images' / '.00000079_000.png.x1y2.png.tmp').write_bytes(b'\x89PNG half')
    done = A._load_records(out / 'records')
    nxt = min(set(range(len(json.loads((out / 'archive.json').read_text())['patients']))) - set(done))
    (out / 'images' / f'{nxt:08d}_000.png').write_bytes(b'\x89PNG truncated')
    p = _run(args); log = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, log[-3000:]
    _check_archive(out, n, cp)
    # running again changes nothing
    before = {q.name: q.stat().st_mtime_ns for q in (out / 'images').iterdir()}
    p = _run(args); p.communicate(timeout=120)
    assert p.returncode == 0 and before == {q.name: q.stat().st_mtime_ns for q in (out / 'images').iterdir()}


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_sharded_two_ranks(tmp_path, nets, ref_csv):
    "Two processes with the torchrun environment (RANK/WORLD_SIZE/MASTER_*) share the patients and end with one archive."
    gp, cp = nets
    out, n = tmp_path / 's', 17
    args = ['--generator', gp, '--classifier', cp, '--n', n, '--out', out, '--reference', ref_csv, '--steps', 6, '--device', 'cpu']
    port = str(_free_port())
    ps = [_run(args, dict(RANK=str(r), WORLD_SIZE='2', LOCAL_RANK=str(r), MASTER_ADDR='127.0.0.1', MASTER_PORT=port)) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0].decode() for p in ps]
    assert [p.returncode for p in ps] == [0, 0], logs
    _check_archive(out, n, cp)
    recs = A._load_records(out / 'records')
    assert len(recs) == len(json.loads((out / 'archive.json').read_text())['patients'])


def test_cli_errors(tmp_path, nets):
    gp, cp = nets
    from cxr_pggan.cli import main
    assert main(['archive', '--generator', str(tmp_path / 'none.pt'), '--classifier', str(cp), '--n', '3', '--out', str(tmp_path / 'o')]) == 2
    assert main(['archive', '--generator', str(gp), '--classifier', str(tmp_path / 'none.pt'), '--n', '3', '--out', str(tmp_path / 'o')]) == 2


def test_stages_compose_to_build_archive(tmp_path, nets, ref_csv):
    """`build_archive` is its stages (open, plan, resume, generate one patient after another, finalise): run one by one they
    write the same archive byte for byte, so a generate stage that records patients the same way can replace the loop."""
    gp, cp = nets
    cfg = A.ArchiveConfig(reference=ref_csv, steps=6, seed=2)
    A.build_archive(gp, cp, 9, tmp_path / 'whole', config=cfg)
    out = tmp_path / 'staged'
    rank, world, _ = A.open_archive_folder(out, 9, cfg)
    G, clf = A.archive_networks(gp, cp, torch.device('cpu'))
    plan, prev = A.archive_plan(out, 9, G, clf, cp, cfg, torch.device('cpu'), rank, world)
    state = A.resume_state(out, plan, rank, world)
    for pid in list(state.todo):
        A.record_patient(out, pid, A.generate_patient(G, clf, out, pid, plan, prev, state, cfg, torch.device('cpu')), state)
    assert A.finish_archive(out, state, plan, 9, False, 0.0, cfg, rank, world)['complete']
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob('*')
                       if p.is_file() and not p.name.startswith('.') and not p.name.endswith('.provenance.json')}
    whole, staged = files(tmp_path / 'whole'), files(out)
    assert sorted(whole) == sorted(staged) and len([f for f in whole if f.endswith('.png')]) == 9
    assert whole == staged


def test_config_and_keyword_knobs_agree(tmp_path, nets, ref_csv):
    "`build_archive(..., config=ArchiveConfig(...))` and the same knobs by name build the same archive; a positional knob is refused."
    gp, cp = nets
    A.build_archive(gp, cp, 5, tmp_path / 'kw', reference=ref_csv, steps=5, seed=4, images_per_patient=(2, 3))
    A.build_archive(gp, cp, 5, tmp_path / 'cfg', config=A.ArchiveConfig(reference=ref_csv, steps=5, seed=4, images_per_patient=(2, 3)))
    assert (tmp_path / 'kw' / A.CSV_NAME).read_bytes() == (tmp_path / 'cfg' / A.CSV_NAME).read_bytes()
    with pytest.raises(TypeError): A.build_archive(gp, cp, 5, tmp_path / 'pos', ref_csv)
