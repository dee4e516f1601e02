"""What a user meets, through the real command line (its entry point in-process, or `python -m cxr_pggan` in a
subprocess where a process matters: see `cli`): every bad input or fault gives one line that
names the file or option (exit status 2, no traceback) or works; no file that was there before is changed."""
import hashlib, json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np, pandas as pd, pytest
from PIL import Image

HERE = Path(__file__).resolve().parent


SUBPROCESS = os.environ.get('CXR_PGGAN_TEST_SUBPROCESS', '0') == '1'


def cli(ws, *args, env=None, timeout=240, cwd=None, fresh_process=False):
    """`cxr-pggan ARGS` with the workspace's outputs folder; returns a CompletedProcess (returncode, stdout, stderr).
    It runs the console script's own entry point (`cxr_pggan.cli.main`) in this process, with the same environment,
    working folder and captured streams a subprocess would get: a fresh `python -m cxr_pggan` costs about 3 s of imports
    per call on the 2-core machine, and this suite makes over a hundred calls. `fresh_process=True` (or
    `CXR_PGGAN_TEST_SUBPROCESS=1` for the whole suite) runs the real `python -m cxr_pggan` in a subprocess instead:
    for what only a process shows (its exit, signals, a timeout, output written below Python's streams)."""
    e = dict(os.environ, TQDM_DISABLE='1', MPLBACKEND='Agg', CXR_PGGAN_OUTPUTS=str(ws / 'outputs'), OMP_NUM_THREADS='1')
    e.pop('CXR_PGGAN_DEBUG', None); e.update(env or {})
    argv = list(map(str, args))
    if fresh_process or SUBPROCESS:
        return subprocess.run([sys.executable, '-m', 'cxr_pggan', *argv], capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)
    return in_process(argv, e, cwd)


def in_process(argv, env, cwd=None):
    "`cxr_pggan.cli.main(argv)` with `env` as the whole environment and `cwd` as the working folder, both restored after."
    import contextlib, io, warnings
    from cxr_pggan.cli import main
    saved_env, saved_cwd, out, err = dict(os.environ), os.getcwd(), io.StringIO(), io.StringIO()
    try:
        os.environ.clear(); os.environ.update(env)
        if cwd is not None: os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter('default')                  # every call shows its warnings, as a new process would,
            warnings.showwarning = warnings._showwarning_orig   # on its stderr (not into pytest's record of the test's warnings)
            warnings._showwarnmsg_impl = lambda m: sys.stderr.write(warnings._formatwarnmsg(m))
            try: rc = main(argv)
            except SystemExit as x:                           # argparse's usage errors, sys.exit in a verb
                rc = x.code if isinstance(x.code, int) else (0 if x.code is None else 1)
                if isinstance(x.code, str): print(x.code, file=sys.stderr)
    finally:
        os.chdir(saved_cwd); os.environ.clear(); os.environ.update(saved_env)
    return subprocess.CompletedProcess(['cxr-pggan', *argv], rc, out.getvalue(), err.getvalue())


def tree(folder) -> dict:
    "sha256 and mode of every file under `folder` (or of the file itself)."
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob('*') if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode) for p in files}


def one_error(r, *needles):
    "Exit status 2, no traceback, one `cxr-pggan ...:` line that contains every needle."
    lines = [l for l in r.stderr.splitlines() if l.startswith('cxr-pggan')]
    assert r.returncode == 2, (r.returncode, r.stdout[-800:], r.stderr[-1500:])
    assert 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1, r.stderr
    for n in needles: assert n in lines[0], (n, lines[0])
    return lines[0]


def _png(path, a, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True); Image.fromarray(a, mode).save(path)


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    "A workspace: a user's NIH-layout folder, random networks, broken files of every kind."
    ws = tmp_path_factory.mktemp('ws')
    rng = np.random.default_rng(0)
    user = ws / 'userdata'; rows = []
    labels = ['No Finding', 'Cardiomegaly', 'Effusion', 'No Finding', 'Hernia', 'Mass', 'No Finding', 'Nodule'] * 2
    for i in range(16):
        name = f'{i // 2:08d}_{i % 2:03d}.png'
        _png(user / 'images' / name, (rng.random((40, 40)) * 255).astype(np.uint8))
        rows.append(dict(**{'Image Index': name, 'Finding Labels': labels[i], 'Follow-up #': i % 2, 'Patient ID': i // 2,
                            'Patient Age': 40 + i, 'Patient Gender': 'MF'[i % 2], 'View Position': 'PA'}))
    pd.DataFrame(rows).to_csv(user / 'Data_Entry_2017.csv', index=False)
    from cxr_pggan.latent import random_networks
    gan, clf = random_networks(ws / 'nets', 16)
    b = gan.read_bytes()
    (ws / 'truncated.pt').write_bytes(b[:len(b) // 2])
    import torch                                                    # bit rot inside a tensor: the zip still reads, the checksum does not
    ck = torch.load(gan, weights_only=True); k = next(iter(ck['G'])); ck['G'][k].view(-1)[0] += 1.0; torch.save(ck, ws / 'flipped.pt')
    (ws / 'random.pt').write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    # a pickle that would run code when unpickled: its __reduce__ creates a file
    (ws / 'evil.pt').write_bytes(subprocess.run([sys.executable, '-c', f'''
import os, pickle, sys, torch
class Evil:
    def __reduce__(self): return (os.system, ('touch {ws / "PWNED"}',))
torch.save(dict(G=Evil()), sys.stdout.buffer)'''], capture_output=True, check=True).stdout)
    (ws / 'foreign.pt').write_bytes(b'a file of the user')
    (ws / 'empty.csv').write_text('')
    pd.read_csv(user / 'Data_Entry_2017.csv').to_csv(ws / 'semicolon.csv', sep=';', index=False)
    pd.read_csv(user / 'Data_Entry_2017.csv').assign(**{'Finding Labels': 'Flu'}).to_csv(ws / 'badlabel.csv', index=False)
    # image kinds that work: RGBA, 16-bit, a JPEG named .png, 12-bit data in 16-bit storage
    kinds = ws / 'kinds'
    _png(kinds / 'rgba.png', np.dstack([(rng.random((40, 40, 3)) * 255).astype(np.uint8), np.full((40, 40), 255, np.uint8)]), 'RGBA')
    _png(kinds / 'g16.png', (rng.random((40, 40)) * 65535).astype(np.uint16))
    Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(kinds / 'jpeg_named.png', format='JPEG')
    twelve = ws / 'twelve'
    for i in range(3): _png(twelve / f'{i}.png', (rng.random((40, 40)) * 4095).astype(np.uint16))
    small = ws / 'small32'
    for i in range(3): _png(small / f'{i}.png', (rng.random((32, 32)) * 255).astype(np.uint8))
    one = ws / 'one'; _png(one / 'only.png', np.zeros((40, 40), np.uint8))
    # a real splits file of the user folder
    assert cli(ws, 'split', '--metadata', user / 'Data_Entry_2017.csv', '--out', ws / 'splits', '--fractions', '0.5', '0.25', '0.25').returncode == 0
    return dict(root=ws, user=user, gan=gan, clf=clf, kinds=kinds, twelve=twelve, small=small, one=one)


def _protect(*paths):
    return {str(p): tree(p) for p in paths}


# ---- no command deletes or overwrites what it did not write --------------------------------------------------------

@pytest.mark.parametrize('verb', ['phantom', 'archive', 'generate', 'split', 'reproduce'])
def test_writers_refuse_a_users_folder(ws, verb):
    u, w = ws['user'], ws['root']
    before = tree(u)
    argv = dict(phantom=['phantom', '--out', u, '--n', '16', '--size', '64'],
                archive=['archive', '--generator', ws['gan'], '--classifier', ws['clf'], '--n', '3', '--out', u],
                generate=['generate', '--checkpoint', ws['gan'], '--n', '2', '--out', u],
                split=['split', '--metadata', u / 'Data_Entry_2017.csv', '--out', u],
                reproduce=['reproduce', '--profile', 'smoke', '--only', '01', '--out', u])[verb]
    one_error(cli(w, *argv), str(u), 'not empty', '--force')
    assert tree(u) == before


def test_force_writes_beside_but_never_over(ws):
    u, w = ws['user'], ws['root']
    before = tree(u)
    one_error(cli(w, 'phantom', '--out', u, '--n', '16', '--size', '64', '--force'), 'Data_Entry_2017.csv', 'never overwritten')
    r = cli(w, 'generate', '--checkpoint', ws['gan'], '--n', '2', '--out', u, '--force')
    assert r.returncode == 0, r.stderr
    after = tree(u)
    assert all(after[k] == v for k, v in before.items())                          # every user file intact
    assert (u / 'synthetic_000001.png').is_file()
    for p in (u / 'synthetic_000000.png', u / 'synthetic_000001.png', u / 'latents.npy', u / 'latents.npy.provenance.json', u / '.cxr_pggan.json'):
        p.unlink()
    assert tree(u) == before


def test_force_never_overwrites_with_a_relative_out(ws):
    "The foreign record holds names inside the folder; an --out given relative to the working directory still finds them."
    w = ws['root']; u = w / 'relative_user'; u.mkdir()
    (u / 'synthetic_000000.png').write_bytes(b'a file of the user')
    before = tree(u)
    one_error(cli(w, 'generate', '--checkpoint', ws['gan'], '--n', '2', '--out', 'relative_user', '--force', cwd=w),
              'synthetic_000000.png', 'never overwritten')
    after = tree(u)
    assert all(after[k] == v for k, v in before.items())


@pytest.mark.parametrize('verb', ['train-classifier', 'convert-weights', 'fid-json', 'bench-json'])
def test_single_file_outputs_are_not_overwritten(ws, verb):
    w, f = ws['root'], ws['root'] / 'foreign.pt'
    before = tree(f)
    argv = {'train-classifier': ['train-classifier', '--profile', 'smoke', '--data', ws['user'], '--out', f],
            'convert-weights': ['convert-weights', ws['gan'], f],
            'fid-json': ['fid', '--real', ws['kinds'], '--fake', ws['kinds'], '--allow-random-weights', '--json', f],
            'bench-json': ['bench', 'split', '--metadata', ws['user'] / 'Data_Entry_2017.csv', '--repeats', '1', '--json', f]}[verb]
    one_error(cli(w, *argv), str(f), 'not written by cxr-pggan')
    assert tree(f) == before


# ---- checkpoints: corrupt files named, never called pickles; auto-resume falls back -------------------------------------

@pytest.mark.parametrize('bad', ['truncated.pt', 'flipped.pt', 'random.pt'])
@pytest.mark.parametrize('verb', ['generate', 'convert-weights', 'archive', 'fid'])
def test_corrupt_checkpoints(ws, bad, verb):
    w, ck = ws['root'], ws['root'] / bad
    argv = dict(generate=['generate', '--checkpoint', ck, '--n', '2', '--out', w / f'gen_{bad}'],
                **{'convert-weights': ['convert-weights', ck, w / f'conv_{bad}']},
                archive=['archive', '--generator', ck, '--classifier', ws['clf'], '--n', '3', '--out', w / f'arch_{bad}'],
                fid=['fid', '--real', ws['kinds'], '--fake', ck, '--n', '2', '--allow-random-weights'])[verb]
    line = one_error(cli(w, *argv), str(ck), 'not a readable checkpoint (truncated or corrupt)')
    assert 'pickle' not in line


@pytest.mark.parametrize('verb', ['generate', 'fid', 'convert-weights'])
def test_code_executing_pickles_refused(ws, verb):
    w, ck = ws['root'], ws['root'] / 'evil.pt'
    argv = dict(generate=['generate', '--checkpoint', ck, '--n', '2', '--out', w / 'gen_evil'],
                fid=['fid', '--real', ws['kinds'], '--fake', ck, '--n', '2', '--allow-random-weights'],
                **{'convert-weights': ['convert-weights', ck, w / 'conv_evil.pt']})[verb]
    one_error(cli(w, *argv), str(ck), '--trust-pickle')
    assert not (w / 'PWNED').exists()


def test_corrupt_classifier_and_inception_weights(ws):
    w = ws['root']
    one_error(cli(w, 'fid', '--real', ws['kinds'], '--fake', ws['kinds'], '--inception-weights', w / 'truncated.pt'),
              'truncated.pt', 'not a readable FID Inception weights file')
    one_error(cli(w, 'fid', '--real', ws['kinds'], '--fake', ws['kinds'], '--metrics', 'fid_cxr', '--classifier', w / 'truncated.pt'),
              'truncated.pt', 'not a readable classifier checkpoint')


TINY = ['--profile', 'smoke', '--set', 'resolution=8', '--set', 'latent_dim=8', '--set', 'fmap_base=16', '--set', 'fmap_max=8',
        '--set', 'kimg_stab=0.032', '--set', 'kimg_fade=0.032', '--set', 'kimg_last=0.064', '--set', 'checkpoint_kimg=0.016',
        '--set', 'keep_checkpoints=20', '--set', 'sample_kimg=0', '--set', 'log_every=2', '--set', 'n_samples=4',
        '--set', 'train_split=all']   # every image of the folder (the smoke profile's 'train' split would leave some unread)


def test_train_resume_skips_a_corrupt_checkpoint_and_refuses_other_networks(ws):
    w = ws['root']
    r = cli(w, 'train', '--data', ws['user'], '--run', 'res', *TINY)
    assert r.returncode == 0, r.stderr
    run = w / 'outputs' / 'checkpoints' / 'res'
    cks = sorted(run.glob('ckpt_*.pt'))
    newest = cks[-1]; newest.write_bytes(newest.read_bytes()[:1000])             # truncate the newest
    r = cli(w, 'train', '--data', ws['user'], '--run', 'res', *TINY)
    assert r.returncode == 0, r.stderr
    assert f'skipping {newest}' in r.stderr and f'resuming from {cks[-2]}' in r.stdout
    # a checkpoint of other networks, and a model file, given to --resume
    one_error(cli(w, 'train', '--data', ws['user'], '--run', 'res2', *TINY, '--set', 'latent_dim=16', '--resume', cks[-2]),
              str(cks[-2]), 'cannot resume', 'latent_dim')
    one_error(cli(w, 'train', '--data', ws['user'], '--run', 'res3', *TINY, '--resume', run / 'final.pt'),
              'final.pt', 'model file, not a training checkpoint')
    one_error(cli(w, 'train', '--data', ws['user'], '--run', 'res4', *TINY, '--resume', w / 'random.pt'), 'random.pt', 'truncated or corrupt')


@pytest.mark.parametrize('verb', ['train', 'archive'])
def test_kill_9_then_resume(ws, verb):
    "A real SIGKILL mid-run, then the same command again: it finishes, with nothing duplicated or half-written."
    w = ws['root']
    argv = (['train', '--data', ws['user'], '--run', 'killed', *TINY, '--set', 'kimg_last=0.4'] if verb == 'train' else
            ['archive', '--generator', ws['gan'], '--classifier', ws['clf'], '--n', '40', '--steps', '5', '--out', w / 'killed_archive'])
    e = dict(os.environ, TQDM_DISABLE='1', CXR_PGGAN_OUTPUTS=str(w / 'outputs'), OMP_NUM_THREADS='1')
    p = subprocess.Popen([sys.executable, '-m', 'cxr_pggan', *map(str, argv)], env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch = (w / 'outputs' / 'checkpoints' / 'killed') if verb == 'train' else (w / 'killed_archive' / 'records')
    t0 = time.time()                                # no wall-clock verdict: a loaded machine only makes this wait longer
    done = lambda: len(list(watch.glob('ckpt_*.pt'))) >= 1 if verb == 'train' else len(list(watch.glob('[!.]*'))) >= 3
    while time.time() - t0 < 1800 and p.poll() is None and not (watch.exists() and done()): time.sleep(0.1)   # finished files, not temporary ones
    assert p.poll() is None, 'the run ended before it could be killed: make it longer'
    p.send_signal(signal.SIGKILL); p.wait()
    r = cli(w, *argv)
    assert r.returncode == 0, r.stderr
    if verb == 'train':
        assert 'resuming from' in r.stdout and (watch / 'final.pt').is_file()
    else:
        meta = pd.read_csv(w / 'killed_archive' / 'Data_Entry_2017.csv')
        assert len(meta) == 40 and sorted(p.name for p in (w / 'killed_archive' / 'images').iterdir()) == sorted(meta['Image Index'])


# ---- one clear line for every user error ---------------------------------------------------------------------------

@pytest.mark.parametrize('case', ['empty', 'semicolon', 'fractions', 'label'])
def test_split_errors(ws, case):
    w = ws['root']
    argv = dict(empty=['--metadata', w / 'empty.csv'], semicolon=['--metadata', w / 'semicolon.csv'],
                fractions=['--metadata', ws['user'] / 'Data_Entry_2017.csv', '--fractions', '0.5', '0.6'],
                label=['--metadata', w / 'badlabel.csv'])[case]
    need = dict(empty=('empty.csv', 'empty'), semicolon=('semicolon.csv', "separated by ';'"), fractions=('--fractions', 'sum to 1'),
                label=('badlabel.csv', "unknown finding 'Flu'"))[case]
    one_error(cli(w, 'split', *argv, '--out', w / f'split_{case}'), *need)


def test_split_warns_about_splits_without_positives(ws):
    r = cli(ws['root'], 'split', '--metadata', ws['user'] / 'Data_Entry_2017.csv', '--out', ws['root'] / 'split_warn')
    assert r.returncode == 0 and "has no image with Hernia" in r.stderr


@pytest.mark.parametrize('argv, needles', [
    (['generate', '--n', '-5'], ('--n', '>= 1')), (['generate', '--n', '0'], ('--n', '>= 1')), (['generate', '--n', '2', '--batch', '0'], ('--batch', '>= 1')),
    (['generate', '--n', '2', '--device', 'cuda'], ('--device cuda', 'no CUDA device')),
    (['generate', '--n', '2', '--out', '/sys/cxr_pggan_test'], ('/sys/cxr_pggan_test', 'permission denied')),
])
def test_generate_arguments(ws, argv, needles):
    if 'cuda' in argv:
        import torch
        if torch.cuda.is_available(): pytest.skip('this machine has a GPU')
    argv = argv[:1] + ['--checkpoint', str(ws['gan'])] + argv[1:]
    if '--out' not in argv: argv += ['--out', str(ws['root'] / 'gen_args')]
    one_error(cli(ws['root'], *argv), *needles)


def test_disk_full_is_one_line(ws, tmp_path):
    "ENOSPC while writing (simulated at the atomic rename, where every output lands) names the file."
    site = tmp_path / 'site'; site.mkdir()
    (site / 'sitecustomize.py').write_text("import os\n_r = os.replace\n"
                                           "def replace(a, b, *k, **kw):\n    raise OSError(28, 'No space left on device', str(b))\nos.replace = replace\n")
    r = cli(ws['root'], 'generate', '--checkpoint', ws['gan'], '--n', '2', '--out', tmp_path / 'full', env=dict(PYTHONPATH=str(site)),
            fresh_process=True)                               # sitecustomize runs only at a process's start
    one_error(r, 'disk full while writing', str(tmp_path / 'full'))


def test_fid_inputs(ws):
    w = ws['root']
    one_error(cli(w, 'fid', '--real', ws['one'], '--fake', ws['kinds'], '--allow-random-weights'), str(ws['one']), '1 image(s)', 'at least 2')
    one_error(cli(w, 'fid', '--real', w / 'splits' / 'splits.csv', '--fake', ws['kinds'], '--allow-random-weights'),
              'is a splits file', '--splits', '--split')
    one_error(cli(w, 'fid', '--real', ws['user'], '--fake', ws['kinds'], '--split', 'test', '--allow-random-weights'), '--split test', '--splits')
    r = cli(w, 'fid', '--real', ws['user'], '--fake', ws['user'], '--split', 'test', '--splits', w / 'splits' / 'splits.csv',
            '--allow-random-weights', '--kid-subsets', '0')
    n_test = int((pd.read_csv(w / 'splits' / 'splits.csv')['split'] == 'test').sum())
    assert r.returncode == 0 and f'N={n_test} vs N={n_test}' in r.stdout, r.stderr
    # a metadata CSV that lists missing images: the advice names an option fid has, which then works
    meta = pd.read_csv(ws['user'] / 'Data_Entry_2017.csv')
    pd.concat([meta, meta.head(1).assign(**{'Image Index': 'missing.png'})]).to_csv(ws['user'] / 'with_missing.csv', index=False)
    one_error(cli(w, 'fid', '--real', ws['user'] / 'with_missing.csv', '--fake', ws['kinds'], '--allow-random-weights'), 'missing', '--drop-missing')
    r = cli(w, 'fid', '--real', ws['user'] / 'with_missing.csv', '--fake', ws['kinds'], '--allow-random-weights', '--drop-missing', '--kid-subsets', '0')
    assert r.returncode == 0, r.stderr
    (ws['user'] / 'with_missing.csv').unlink()


def test_fid_warns_about_resolutions_12_bit_and_reports_classifier_init(ws, tmp_path):
    w = ws['root']
    r = cli(w, 'fid', '--real', ws['kinds'], '--fake', ws['small'], '--allow-random-weights', '--kid-subsets', '0')
    assert r.returncode == 0 and 'different resolutions (40² vs 32²)' in r.stderr, r.stderr
    r = cli(w, 'fid', '--real', ws['twelve'], '--fake', ws['twelve'], '--allow-random-weights', '--kid-subsets', '0')
    assert r.returncode == 0 and '12-bit' in r.stderr
    r = cli(w, 'fid', '--real', ws['kinds'], '--fake', ws['kinds'], '--metrics', 'fid_cxr', '--classifier', ws['clf'], '--json', tmp_path / 'c.json')
    assert r.returncode == 0, r.stderr
    init = json.loads((tmp_path / 'c.json').read_text())['extractors']['classifier']['init_weights']
    assert init.startswith('none: random initialisation (as recorded')


def test_image_kinds_that_work(ws):
    "RGBA, 16-bit and a JPEG with a .png name all decode; FID between the set and itself is 0."
    r = cli(ws['root'], 'fid', '--real', ws['kinds'], '--fake', ws['kinds'], '--allow-random-weights', '--kid-subsets', '0')
    assert r.returncode == 0 and 'FID 0.000 (N=3 vs N=3)' in r.stdout, r.stdout + r.stderr


def test_truncated_png_during_training(ws, tmp_path):
    import shutil
    bad = tmp_path / 'bad'; shutil.copytree(ws['user'], bad)
    victim = bad / 'images' / '00000003_000.png'; victim.write_bytes(victim.read_bytes()[:60])
    one_error(cli(ws['root'], 'train', '--data', bad, '--run', 'trunc', *TINY), str(victim), 'truncated or corrupt')
    one_error(cli(ws['root'], 'train-classifier', '--profile', 'smoke', '--data', bad, '--set', 'batch_size=16', '--out', tmp_path / 'c.pt'),
              str(victim), 'truncated or corrupt')


def test_train_data_errors_and_help(ws, tmp_path):
    _png(tmp_path / 'images' / '00000001_000.png', np.zeros((40, 40), np.uint8)); (tmp_path / 'Data_Entry_2017.csv').write_text('')
    one_error(cli(ws['root'], 'train', '--data', tmp_path, '--run', 'empty', *TINY), 'Data_Entry_2017.csv', 'empty')
    h = cli(ws['root'], 'train', '--help').stdout
    for knob in ('adam_eps', 'ema_beta', 'fade_reals', 'precision', 'phantom_n', 'batch_sizes'): assert f'  {knob} = ' in h, knob


def test_tqdm_disable_silences_training(ws):
    r = cli(ws['root'], 'train', '--data', ws['user'], '--run', 'quiet', *TINY, env=dict(TQDM_DISABLE='1'))
    assert r.returncode == 0 and 'kimg [' not in r.stderr and '%|' not in r.stderr


def test_outputs_respect_the_umask(ws, tmp_path):
    r = cli(ws['root'], 'generate', '--checkpoint', ws['gan'], '--n', '1', '--out', tmp_path / 'mode')
    assert r.returncode == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / 'mode').iterdir()}
    assert set(modes.values()) == {0o644}, modes                                    # pytest runs under umask 022


def test_debug_shows_the_traceback(ws):
    r = cli(ws['root'], 'generate', '--checkpoint', ws['root'] / 'truncated.pt', '--n', '1', '--out', ws['root'] / 'dbg', '--debug',
            fresh_process=True)                               # the traceback a process prints when it dies
    assert r.returncode != 0 and 'Traceback' in r.stderr


def test_reproduce_shows_progress_without_transport_warnings(ws):
    r = cli(ws['root'], 'reproduce', '--profile', 'smoke', '--only', '01', fresh_process=True)   # the terminal a user sees
    assert r.returncode == 0, r.stderr[-2000:]
    assert '[reproduce] 01_data: cell 1/' in r.stderr and 'without encryption' not in r.stderr and 'Passed unknown parameter' not in r.stderr
    one_error(cli(ws['root'], 'reproduce', '--profile', 'smoke', '--only', '01', '-p', 'no_such_knob', '1'), 'no_such_knob', 'cxr-pggan params')


# ---- reader study: `cxr-pggan study ...` -----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def study_ws(ws):
    "A tiny study (1 grid of 1, 1 pair) made through the CLI, and an empty folder."
    w = ws['root']; (w / 'empty_images').mkdir(exist_ok=True)
    r = cli(w, 'study', 'create', '--real', ws['kinds'], '--fake', ws['small'], '--out', w / 'study', '--grids', '1', '--grid-size', '1',
            '--pairs', '1', '--display', '32')
    assert r.returncode == 0 and 'admin token' in r.stdout, r.stderr
    r = cli(w, 'study', 'add-reader', w / 'study', '--name', 'Dr A', '--role', 'consultant')
    assert r.returncode == 0 and '/r/' in r.stdout, r.stderr
    return w / 'study'


@pytest.mark.parametrize('case', ['missing-real', 'empty-fake', 'too-few', 'same-set', 'url-subpath', 'out-not-ours', 'study-exists', 'not-a-study',
                                  'missing-study', 'bad-role', 'same-reader', 'export-over-foreign', 'port-in-use'])
def test_study_bad_inputs(ws, study_ws, case):
    import socket
    w, u = ws['root'], ws['user']
    protect = [u, study_ws / 'study.sqlite', w / 'foreign.pt']
    before = {str(p): tree(p) for p in protect}
    small = ['--grids', '1', '--grid-size', '1', '--pairs', '1']
    sock = None
    if case == 'port-in-use':
        sock = socket.socket(); sock.bind(('127.0.0.1', 0)); sock.listen(1); port = sock.getsockname()[1]
    try:
        argv, needles = {
            'missing-real': (['study', 'create', '--real', w / 'no_such_dir', '--fake', ws['small'], '--out', w / 's1'], [str(w / 'no_such_dir'), 'no such folder']),
            'empty-fake': (['study', 'create', '--real', ws['kinds'], '--fake', w / 'empty_images', '--out', w / 's2'], [str(w / 'empty_images'), 'no images']),
            'too-few': (['study', 'create', '--real', ws['one'], '--fake', ws['small'], '--out', w / 's3'], ['real images are needed', '--pairs']),
            'same-set': (['study', 'create', '--real', ws['small'], '--fake', ws['small'], '--out', w / 's4', *small], ['--real and --fake share', 'separate']),
            'url-subpath': (['study', 'create', '--real', ws['kinds'], '--fake', ws['small'], '--out', w / 's5', '--url', 'https://x.org/study', *small],
                            ['--url', 'own host name']),
            'out-not-ours': (['study', 'create', '--real', ws['kinds'], '--fake', ws['small'], '--out', u, *small], [str(u), 'not empty', '--force']),
            'study-exists': (['study', 'create', '--real', ws['kinds'], '--fake', ws['small'], '--out', study_ws, *small], ['already holds a reader study']),
            'not-a-study': (['study', 'serve', u], [str(u), 'not a reader study']),
            'missing-study': (['study', 'add-reader', w / 'nowhere', '--name', 'X', '--role', 'other'], [str(w / 'nowhere'), 'study create']),
            'bad-role': (['study', 'add-reader', study_ws, '--name', 'X', '--role', 'nurse'], ['--role', 'nurse']),
            'same-reader': (['study', 'add-reader', study_ws, '--name', 'Dr A', '--role', 'other'], ['Dr A', 'already exists']),
            'export-over-foreign': (['study', 'export', study_ws, '--out', w / 'foreign.pt'], [str(w / 'foreign.pt'), 'not written by cxr-pggan']),
            'port-in-use': (['study', 'serve', study_ws, '--port', str(port) if sock else '0'], ['--port', 'another']),
        }[case]
        one_error(cli(w, *argv, timeout=60), *needles)
    finally:
        if sock: sock.close()
    assert {str(p): tree(p) for p in protect} == before
    for k in ('s1', 's2', 's3', 's4', 's5'): assert not (w / k / 'study.sqlite').exists()
# ---- Table 2's synthetic columns: training on an archive or an embedding, testing on the real test split -------------

def test_class_generated_training_needs_patients_and_a_test_split(ws, tmp_path):
    "An archive without patients and a test folder without a test split: one line each, naming the file and the fix."
    import shutil
    w, u = ws['root'], ws['user']
    nopat = tmp_path / 'nopatients'; shutil.copytree(u, nopat)
    pd.read_csv(nopat / 'Data_Entry_2017.csv').drop(columns='Patient ID').to_csv(nopat / 'Data_Entry_2017.csv', index=False)
    one_error(cli(w, 'train-classifier', '--profile', 'smoke', '--data', nopat, '--test-data', u, '--out', tmp_path / 'a.pt'),
              str(nopat / 'Data_Entry_2017.csv'), "no 'Patient ID' column", 'cxr-pggan archive')
    trainval = tmp_path / 'trainval.csv'
    pd.read_csv(u / 'Data_Entry_2017.csv')[['Image Index', 'Patient ID']].assign(split=lambda d: np.where(d['Patient ID'] < 4, 'train', 'val')).to_csv(trainval, index=False)
    other = tmp_path / 'other'; shutil.copytree(u, other)
    pd.read_csv(other / 'Data_Entry_2017.csv').assign(**{'Patient ID': lambda d: d['Patient ID'] + 100}).to_csv(other / 'Data_Entry_2017.csv', index=False)
    one_error(cli(w, 'train-classifier', '--profile', 'smoke', '--data', other, '--test-data', u, '--test-splits', trainval, '--out', tmp_path / 'b.pt'),
              str(trainval), "no 'test' split", 'cxr-pggan split')
    # the same patients in training and test (a real folder given as its own training set without its split) are refused
    one_error(cli(w, 'train-classifier', '--profile', 'smoke', '--data', u, '--test-data', u, '--test-splits', ws['root'] / 'splits' / 'splits.csv',
                  '--out', tmp_path / 'c.pt'), 'also in the training/validation images', '--splits')
    assert not any((tmp_path / f).exists() for f in ('a.pt', 'b.pt', 'c.pt'))


def test_encoder_for_another_generator(ws, tmp_path):
    "An encoder used with a generator of another resolution: one line naming the encoder file and the command that fixes it."
    w = ws['root']
    from cxr_pggan.latent import random_networks
    g8, _ = random_networks(tmp_path / 'nets8', 8)
    enc = tmp_path / 'enc.pt'
    r = cli(w, 'train-encoder', '--generator', ws['gan'], '--profile', 'smoke', '--set', 'encoder_steps=2', '--set', 'encoder_eval_every=1', '--out', enc)
    assert r.returncode == 0, r.stderr[-1500:]
    one_error(cli(w, 'embed', '--encoder', enc, '--generator', g8, '--data', ws['user'], '--out', tmp_path / 'emb'),
              str(enc), 'resolution 16 (encoder) vs 8', 'cxr-pggan train-encoder --generator')
    assert not (tmp_path / 'emb').exists()
    one_error(cli(w, 'embed', '--encoder', ws['gan'], '--generator', ws['gan'], '--data', ws['user'], '--out', tmp_path / 'emb'),
              str(ws['gan']), 'not an encoder')
    before = tree(enc)                                                                  # an existing encoder of another generator is not overwritten
    one_error(cli(w, 'train-encoder', '--generator', g8, '--profile', 'smoke', '--out', enc), str(enc), 'another generator')
    assert tree(enc) == before
# ---- Kaggle reuse: official split, time budget, resume_from, precision

def test_official_split_patient_in_both_lists(ws, tmp_path):
    import shutil
    d = tmp_path / 'nih'; shutil.copytree(ws['user'], d)
    names = pd.read_csv(d / 'Data_Entry_2017.csv')['Image Index'].tolist()     # patient p has images 2p and 2p+1
    (d / 'train_val_list.txt').write_text('\n'.join(names[:11])); (d / 'test_list.txt').write_text('\n'.join(names[11:]))
    before = tree(d)
    one_error(cli(ws['root'], 'split', '--metadata', d / 'Data_Entry_2017.csv', '--official', '--out', tmp_path / 's'),
              'patient 5 has images in both', 'train_val_list.txt', 'test_list.txt')
    (d / 'test_list.txt').unlink()
    one_error(cli(ws['root'], 'split', '--metadata', d / 'Data_Entry_2017.csv', '--official', '--out', tmp_path / 's'),
              'test_list.txt', "split='official'")
    (d / 'train_val_list.txt').write_text('\n'.join(names[:10])); (d / 'test_list.txt').write_text('\n'.join(names[10:]))
    r = cli(ws['root'], 'split', '--metadata', d / 'Data_Entry_2017.csv', '--official', '--out', tmp_path / 's')
    assert r.returncode == 0, r.stderr[-1500:]
    s = pd.read_csv(tmp_path / 's' / 'splits.csv')
    assert set(s.loc[s['split'] == 'test', 'Image Index']) == set(names[10:])
    assert {k: v for k, v in tree(d).items() if 'list.txt' not in k} == {k: v for k, v in before.items() if 'list.txt' not in k}


def test_bad_time_budget_and_resume_from_without_checkpoint(ws, tmp_path):
    one_error(cli(ws['root'], 'train', '--data', ws['user'], '--run', 'budget', *TINY, '--time-budget', '11 hours'),
              "time_budget '11 hours'", '11h30m')
    (tmp_path / 'empty_output').mkdir()
    one_error(cli(ws['root'], 'train', '--data', ws['user'], '--run', 'rf', *TINY, '--resume-from', tmp_path / 'empty_output'),
              str(tmp_path / 'empty_output'), 'no training checkpoint')
    one_error(cli(ws['root'], 'archive', '--generator', ws['gan'], '--classifier', ws['clf'], '--n', '3', '--out', tmp_path / 'a',
                  '--resume-from', tmp_path / 'empty_output'), 'no archive.json')
    one_error(cli(ws['root'], 'train', '--data', ws['user'], '--run', 'p', *TINY, '--set', 'precision=fp8'), 'precision', 'fp16')


def test_kaggle_dataset_outside_kaggle(ws):
    e = {k: '' for k in ('KAGGLE_KERNEL_RUN_TYPE',)}
    one_error(cli(ws['root'], 'train', '--profile', 'smoke', '--data', 'kaggle', '--run', 'k', env=e), "dataset='kaggle'", 'KAGGLE_KERNEL_RUN_TYPE')


def test_time_budget_stops_training_cleanly(ws, tmp_path):
    r = cli(ws['root'], 'train', '--data', ws['user'], '--run', 'tb', *TINY, '--time-budget', '0.001s')
    assert r.returncode == 0, r.stderr[-1500:]
    assert 'time budget 0.001s reached' in r.stdout and '--resume-from' in r.stdout and '"stopped": true' in r.stdout
    r = cli(ws['root'], 'train', '--data', ws['user'], '--run', 'tb', *TINY)                # the same command continues
    assert r.returncode == 0 and 'resuming from' in r.stdout and '"stopped": false' in r.stdout, r.stdout[-1500:]
# ---- the privacy audit: sets, patients, re-identification checkpoints, release copies --------------------------------

def _split_by_followup(ws, tmp_path):
    "train = first images of every user patient, holdout = their follow-ups (the same patients)."
    import shutil
    tr, ho = tmp_path / 'tr', tmp_path / 'ho'
    for p in sorted((ws['user'] / 'images').glob('*.png')):
        d = tr if p.stem.endswith('_000') else ho; d.mkdir(exist_ok=True); shutil.copy(p, d / p.name)
    return tr, ho


@pytest.mark.parametrize('case', ['shared-patients', 'same-images', 'empty-synthetic', 'bad-features', 'users-folder'])
def test_audit_inputs(ws, tmp_path, case):
    w, u = ws['root'], ws['user']
    tr, ho = _split_by_followup(ws, tmp_path)
    (tmp_path / 'empty').mkdir()
    before = _protect(u, ws['small'])
    base = ['audit', '--train', tr, '--holdout', ho, '--synthetic', ws['small'], '--out', tmp_path / 'out']
    if case == 'shared-patients': one_error(cli(w, *base), f'--holdout {ho}', 'patient 0 (image 00000000_001.png)', 'other patients', '--splits')
    if case == 'same-images': one_error(cli(w, 'audit', '--train', u, '--holdout', u, '--synthetic', ws['small'], '--out', tmp_path / 'out'),
                                        'image 00000000_000.png is also in the training set')
    if case == 'empty-synthetic': one_error(cli(w, *base[:5], '--synthetic', tmp_path / 'empty', '--out', tmp_path / 'out'), f'--synthetic {tmp_path / "empty"}', 'no images')
    if case == 'bad-features': one_error(cli(w, *base, '--features', 'vgg'), "--features 'vgg'", 'classifier:CKPT')
    if case == 'users-folder':
        one_error(cli(w, 'audit', '--train', u, '--holdout', u, '--splits', w / 'splits' / 'splits.csv', '--holdout-split', 'test',
                      '--synthetic', ws['small'], '--out', u), str(u), 'not empty', '--force')
    assert _protect(u, ws['small']) == before and not (tmp_path / 'out' / 'flags.csv').exists()


def test_reid_checkpoint_for_another_resolution_and_release_checks(ws, tmp_path):
    w, u, sp = ws['root'], ws['user'], ws['root'] / 'splits' / 'splits.csv'
    r = cli(w, 'train-reid', '--train', u, '--holdout', u, '--splits', sp, '--holdout-split', 'test', '--steps', '3',
            '--patients-per-batch', '4', '--width', '4', '--out', tmp_path / 'reid40.pt')
    assert r.returncode == 0 and 'AUC' in r.stdout, r.stderr[-1500:]
    sets = ['--train', u, '--holdout', u, '--splits', sp, '--holdout-split', 'test']
    one_error(cli(w, 'audit', *sets, '--synthetic', ws['small'], '--reid', tmp_path / 'reid40.pt', '--out', tmp_path / 'a'),
              f'--reid {tmp_path / "reid40.pt"}', 'trained for 40² images', '32²', 'train-reid', '--resolution 32')
    one_error(cli(w, 'audit', *sets, '--synthetic', ws['small'], '--reid', ws['clf'], '--out', tmp_path / 'a'), str(ws['clf']), 'not a re-identification checkpoint')
    # a real audit (a 40² re-id network for a 40² "archive"), then a release copy; edited flags are refused
    r = cli(w, 'audit', *sets, '--synthetic', ws['kinds'], '--reid', tmp_path / 'reid40.pt', '--prdc-k', '2', '--out', tmp_path / 'audit')
    assert r.returncode == 0, r.stderr[-1500:]
    flags = tmp_path / 'audit' / 'flags.csv'
    assert pd.read_csv(flags)['reid_score'].between(0, 1).all()
    one_error(cli(w, 'archive', '--exclude-flagged', flags, '--out', ws['kinds']), '--out', 'inside it')
    one_error(cli(w, 'archive', '--exclude-flagged', flags, '--archive', ws['small'], '--out', tmp_path / 'rel'), 'not the audited set')
    r = cli(w, 'archive', '--exclude-flagged', flags, '--out', tmp_path / 'rel')
    assert r.returncode == 0 and (tmp_path / 'rel' / 'release.json').is_file(), r.stderr[-1500:]
    flags.write_text(flags.read_text().replace(',False,', ',True,', 1))             # someone "corrects" a flag by hand
    one_error(cli(w, 'archive', '--exclude-flagged', flags, '--out', tmp_path / 'rel2'), str(flags), 'changed after the audit')


def test_train_unknown_train_split(ws):
    "An unknown train_split names the knob, the value and the known splits, before any run folder is made."
    w = ws['root']
    one_error(cli(w, 'train', '--data', ws['user'], '--run', 'badsplit', *TINY, '--set', 'train_split=tset'),
              "train_split='tset'", 'no such split', 'known splits: test, train, val')
    assert not (w / 'outputs' / 'checkpoints' / 'badsplit').exists()
    assert '  train_split = "train" / "train" / "all"' in cli(w, 'train', '--help').stdout


# ==== writers, distances and knobs: one rule for single output files, numerics that hold, one line per bad value ========
# (a separate block, so that it merges cleanly with the rows above)

@pytest.fixture(scope='module')
def trained(ws):
    "A GAN trained by `cxr-pggan train`: its final.pt and the provenance record that says cxr-pggan wrote it, as a GAN model."
    r = cli(ws['root'], 'train', '--data', ws['user'], '--run', 'kinds_gan', *TINY)
    assert r.returncode == 0, r.stderr[-1500:]
    final = ws['root'] / 'outputs' / 'checkpoints' / 'kinds_gan' / 'final.pt'
    assert final.is_file() and final.with_name('final.pt.provenance.json').is_file()
    return final


@pytest.mark.parametrize('verb', ['fid-json', 'bench-json', 'train-classifier', 'train-reid', 'study-export', 'phantom-grid',
                                  'train-summary', 'convert-weights'])
def test_single_file_writers_never_replace_another_kind(ws, trained, study_ws, verb):
    "A trained GAN's final.pt (written by cxr-pggan, as a GAN) given to any other single-file writer: refused, unchanged."
    w, f, sp = ws['root'], trained, ws['root'] / 'splits' / 'splits.csv'
    before = tree(f.parent)
    argv = {'fid-json': ['fid', '--real', ws['kinds'], '--fake', ws['kinds'], '--allow-random-weights', '--kid-subsets', '0', '--json', f],
            'bench-json': ['bench', 'split', '--metadata', ws['user'] / 'Data_Entry_2017.csv', '--repeats', '1', '--json', f],
            'train-classifier': ['train-classifier', '--profile', 'smoke', '--data', ws['user'], '--out', f],
            'train-reid': ['train-reid', '--train', ws['user'], '--holdout', ws['user'], '--splits', sp, '--holdout-split', 'test',
                           '--steps', '1', '--out', f],
            'study-export': ['study', 'export', study_ws, '--out', f],
            'phantom-grid': ['phantom', '--out', w / 'ph_grid', '--n', '4', '--size', '64', '--grid', f],
            'train-summary': ['train', '--data', ws['user'], '--run', 'sumkind', *TINY, '--summary', f],
            'convert-weights': ['convert-weights', ws['gan'], f]}[verb]
    one_error(cli(w, *argv), str(f), 'was written by cxr-pggan as a GAN model, not as a')
    assert tree(f.parent) == before
    if verb == 'phantom-grid': assert not (w / 'ph_grid' / 'images').exists()          # refused before anything was rendered


@pytest.mark.parametrize('verb', ['phantom-grid', 'train-summary'])
def test_grid_and_summary_never_overwrite_a_users_file(ws, tmp_path, verb):
    f = tmp_path / 'mine.png'; f.write_bytes(b'a file of the user'); before = tree(f)
    argv = dict(**{'phantom-grid': ['phantom', '--out', tmp_path / 'ph', '--n', '4', '--size', '64', '--grid', f],
                   'train-summary': ['train', '--data', ws['user'], '--run', 'summine', *TINY, '--summary', f]})[verb]
    one_error(cli(ws['root'], *argv), str(f), 'not written by cxr-pggan')
    assert tree(f) == before


def test_single_file_writers_replace_their_own_kind(ws, tmp_path):
    "The same kind of output is replaced: a second `fid --json` and a second `train --summary` over their own files work."
    w, j, s = ws['root'], tmp_path / 'r.json', tmp_path / 'summary.json'
    for _ in range(2):
        r = cli(w, 'fid', '--real', ws['kinds'], '--fake', ws['kinds'], '--allow-random-weights', '--kid-subsets', '0', '--json', j)
        assert r.returncode == 0, r.stderr[-1500:]
    assert json.loads(j.with_name('r.json.provenance.json').read_text())['kind'] == 'fid result'
    for _ in range(2):
        r = cli(w, 'train', '--data', ws['user'], '--run', 'sumown', *TINY, '--summary', s)
        assert r.returncode == 0, r.stderr[-1500:]
    assert json.loads(s.read_text())['final'] and json.loads(s.with_name('summary.json.provenance.json').read_text())['kind'] == 'training summary'


def test_fid_of_a_set_against_itself_is_zero_not_minus_zero(ws):
    r = cli(ws['root'], 'fid', '--real', ws['twelve'], '--fake', ws['twelve'], '--allow-random-weights', '--kid-subsets', '0')
    assert r.returncode == 0 and 'FID 0.000 (N=3 vs N=3)' in r.stdout and '-0.000' not in r.stdout, r.stdout + r.stderr


def test_kid_subsets_zero_skips_kid_or_is_refused(ws):
    w = ws['root']
    r = cli(w, 'fid', '--real', ws['kinds'], '--fake', ws['small'], '--allow-random-weights', '--kid-subsets', '0')
    assert r.returncode == 0 and 'FID ' in r.stdout and 'KID' not in r.stdout and 'nan' not in r.stdout, r.stdout
    one_error(cli(w, 'fid', '--real', ws['kinds'], '--fake', ws['small'], '--allow-random-weights', '--metrics', 'fid,kid', '--kid-subsets', '0'),
              '--kid-subsets 0', '--metrics', 'kid')


def test_generate_into_its_own_folder_replaces_the_earlier_run(ws, tmp_path):
    "--n 5 then --n 2 into one folder: 2 images beside a 2-row latents.npy (never 5 beside 2); a user's file there is kept."
    w, out = ws['root'], tmp_path / 'gen'
    assert cli(w, 'generate', '--checkpoint', ws['gan'], '--n', '5', '--out', out).returncode == 0
    (out / 'notes.txt').write_text('mine')
    r = cli(w, 'generate', '--checkpoint', ws['gan'], '--n', '2', '--out', out, '--seed', '1', '--force')
    assert r.returncode == 0, r.stderr[-1500:]
    assert sorted(p.name for p in out.glob('*.png')) == ['synthetic_000000.png', 'synthetic_000001.png']
    assert np.load(out / 'latents.npy').shape[0] == 2 and (out / 'notes.txt').read_text() == 'mine'
    assert 'replaced' in cli(w, 'generate', '--help').stdout


def test_generate_refuses_an_n_beyond_its_limit(ws, tmp_path):
    t0 = time.time()
    one_error(cli(ws['root'], 'generate', '--checkpoint', ws['gan'], '--n', '100000000', '--out', tmp_path / 'huge'), '--n 100000000', 'at most 1,000,000')
    assert time.time() - t0 < 60 and not (tmp_path / 'huge').exists()


def test_train_run_name_stays_inside_outputs(ws):
    w = ws['root']
    one_error(cli(w, 'train', '--data', ws['user'], '--run', '../../escaped', *TINY), "--run '../../escaped'", 'inside the outputs folder')
    assert not (w / 'escaped').exists() and not (w.parent / 'escaped').exists()


def test_feature_cache_sees_a_replaced_image_of_the_same_size_and_mtime(ws, tmp_path):
    "BMP files (their size depends on the shape only): one replaced, its mtime set back; the cached FID is the fresh one."
    w, rng = ws['root'], np.random.default_rng(11)
    a, b = tmp_path / 'a', tmp_path / 'b'
    for d in (a, b):
        d.mkdir()
        for i in range(3): Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(d / f'{i}.bmp')
    fid = lambda *x: cli(w, 'fid', '--real', a, '--fake', b, '--allow-random-weights', '--kid-subsets', '0', *x)
    first = fid('--cache', tmp_path / 'cache')
    assert first.returncode == 0, first.stderr[-1500:]
    v = b / '0.bmp'; st = v.stat()
    Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(v)
    os.utime(v, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (v.stat().st_size, v.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    cached, fresh = fid('--cache', tmp_path / 'cache'), fid()
    line = lambda r: next(l for l in r.stdout.splitlines() if l.startswith('FID'))
    assert line(cached) == line(fresh) != line(first), (line(first), line(cached), line(fresh))


@pytest.mark.parametrize('knob, value, needle', [('latent_dim', '0', 'latent_dim=0'), ('fmap_max', '-4', 'fmap_max=-4'), ('ema_beta', '1.5', 'ema_beta=1.5'),
                                                 ('batch_sizes', '[0]', 'batch_sizes'), ('resolution', '48', 'power of two'),
                                                 ('log_every', '0', 'log_every=0'), ('sample_kimg', '0.0001', 'sample_kimg=0.0001')])
def test_train_knobs_out_of_range(ws, knob, value, needle):
    one_error(cli(ws['root'], 'train', '--data', ws['user'], '--run', f'knob_{knob}', *TINY, '--set', f'{knob}={value}'), needle)
    assert not (ws['root'] / 'outputs' / 'checkpoints' / f'knob_{knob}').exists()


def test_contradicting_options_are_named(ws, tmp_path):
    w = ws['root']
    one_error(cli(w, 'train', '--data', ws['user'], '--run', 'rn', *TINY, '--resume', 'none', '--resume-from', tmp_path),
              '--resume none', '--resume-from')
    one_error(cli(w, 'split', '--metadata', ws['user'] / 'Data_Entry_2017.csv', '--out', tmp_path / 's', '--halves', '--fractions', '0.5', '0.5'),
              '--halves', '--fractions')
    assert not (tmp_path / 's').exists()


def test_archive_that_cannot_converge_says_why(ws, tmp_path):
    "A classifier whose thresholds no image reaches: one line naming the targets, the work done and what to change."
    from cxr_pggan.classifier import load_classifier, save_classifier
    clf = load_classifier(ws['clf']); clf.thresholds.fill_(1e6)
    never = save_classifier(clf, tmp_path / 'never.pt')
    line = one_error(cli(ws['root'], 'archive', '--generator', ws['gan'], '--classifier', never, '--n', '3', '--steps', '2', '--candidates', '1',
                         '--max-attempts', '1', '--out', tmp_path / 'arch'), 'no target converges', '1 attempt(s) of 1 candidate latent(s) x 2 step(s)', '--steps')
    assert 'internal error' not in line and 'Cardiomegaly' in line


def test_tiny_images_are_refused_and_upsampling_is_named(ws, tmp_path):
    import shutil
    w = ws['root']
    dot = tmp_path / 'dot'; shutil.copytree(ws['kinds'], dot); _png(dot / 'tiny.png', np.zeros((1, 1), np.uint8))
    one_error(cli(w, 'fid', '--real', dot, '--fake', ws['kinds'], '--allow-random-weights', '--kid-subsets', '0'),
              str(dot / 'tiny.png'), 'smaller than 8 px')
    bad = tmp_path / 'bad'; shutil.copytree(ws['user'], bad); _png(bad / 'images' / '00000002_000.png', np.zeros((1, 1), np.uint8))
    one_error(cli(w, 'train', '--data', bad, '--run', 'tiny', *TINY), '00000002_000.png', 'a 1×1 image')
    small = tmp_path / 'small'; shutil.copytree(ws['user'], small); _png(small / 'images' / '00000002_000.png', np.zeros((8, 8), np.uint8) + 9)
    r = cli(w, 'train', '--data', small, '--run', 'upsampled', *TINY)                # 8 px -> 8²: no warning
    assert r.returncode == 0 and 'upsampled' not in r.stderr, r.stderr[-1500:]
    r = cli(w, 'train', '--data', small, '--run', 'upsampled2', *TINY, '--set', 'resolution=64', '--set', 'kimg_last=0.016')   # 8 px -> 64²: 8x
    assert r.returncode == 0 and '00000002_000.png' in r.stderr and 'upsampled more than 4x to 64²' in r.stderr, r.stderr[-1500:]


def test_fid_cxr_is_labelled_by_the_classifier_it_used(ws, tmp_path):
    r = cli(ws['root'], 'fid', '--real', ws['kinds'], '--fake', ws['kinds'], '--metrics', 'fid_cxr', '--classifier', ws['clf'], '--json', tmp_path / 'c.json')
    assert r.returncode == 0, r.stderr[-1500:]
    assert 'discriminator' in r.stdout and 'DenseNet' not in r.stdout, r.stdout
    assert 'discriminator' in json.loads((tmp_path / 'c.json').read_text())['extractors']['classifier']['label']


def test_convert_weights_keeps_the_training_split(ws, trained, tmp_path):
    import torch
    w = ws['root']
    assert cli(w, 'convert-weights', trained, tmp_path / 'conv.pt').returncode == 0
    origin = torch.load(tmp_path / 'conv.pt', weights_only=True)['meta']['origin']
    assert origin['train_split']['name'] == 'all' and origin['source_format']
    assert cli(w, 'convert-weights', ws['gan'], tmp_path / 'conv_random.pt').returncode == 0      # a source that records none
    assert torch.load(tmp_path / 'conv_random.pt', weights_only=True)['meta']['origin']['train_split'].startswith('unknown')
    assert cli(w, 'convert-weights', trained, tmp_path / 'conv.pt').returncode == 0              # its own kind: replaced


# ---- reader study and privacy release: refusals added with the byte-length, answer-order and audited-bytes checks ------

def test_release_refuses_an_archive_changed_after_its_audit(ws, tmp_path):
    "A release copies only the bytes the audit scored: a new image, an overwritten one or a missing one is refused, naming them."
    import shutil
    w, u, sp = ws['root'], ws['user'], ws['root'] / 'splits' / 'splits.csv'
    arch = tmp_path / 'archive'; shutil.copytree(ws['small'], arch)
    r = cli(w, 'audit', '--train', u, '--holdout', u, '--splits', sp, '--holdout-split', 'test', '--synthetic', arch, '--prdc-k', '2',
            '--out', tmp_path / 'audit')
    assert r.returncode == 0, r.stderr[-1500:]
    flags = tmp_path / 'audit' / 'flags.csv'
    assert pd.read_csv(flags)['sha256'].str.fullmatch('[0-9a-f]{64}').all()
    train_img = sorted((u / 'images').glob('*.png'))[0]
    variants = {}
    variants['new'] = tmp_path / 'new'; shutil.copytree(arch, variants['new']); shutil.copy(train_img, variants['new'] / train_img.name)
    variants['over'] = tmp_path / 'over'; shutil.copytree(arch, variants['over']); shutil.copy(train_img, variants['over'] / '1.png')
    variants['many'] = tmp_path / 'many'; shutil.copytree(arch, variants['many']); (variants['many'] / '0.png').unlink()
    for k in range(5): shutil.copy(train_img, variants['many'] / f'copy_{k}.png')
    before = _protect(arch, tmp_path / 'audit', *variants.values())
    expect = {'new': ['not the audited set', f'1 new image(s) the audit never scored ({train_img.name})', 'nothing was released',
                      'audit this archive again'],
              'over': ['not the audited set', '1 image(s) changed since the audit (1.png)', 'nothing was released'],
              'many': ['5 new image(s) the audit never scored (copy_0.png, copy_1.png, copy_2.png, … (5 in all))',
                       '1 audited image(s) missing (0.png)']}
    for name, needles in expect.items():
        one_error(cli(w, 'archive', '--exclude-flagged', flags, '--archive', variants[name], '--out', tmp_path / f'rel_{name}'),
                  f'--exclude-flagged {flags}', str(variants[name]), *needles)
        assert not (tmp_path / f'rel_{name}').exists()
    assert _protect(arch, tmp_path / 'audit', *variants.values()) == before
    # an audit from before the hashes were recorded (no sha256 column; its audit.json matching that flags file)
    old = tmp_path / 'audit_old'; shutil.copytree(tmp_path / 'audit', old)
    pd.read_csv(old / 'flags.csv').drop(columns='sha256').to_csv(old / 'flags.csv', index=False)
    rec = json.loads((old / 'audit.json').read_text()); rec['flags_sha256'] = hashlib.sha256((old / 'flags.csv').read_bytes()).hexdigest()
    (old / 'audit.json').write_text(json.dumps(rec))
    before_old = _protect(old, arch)
    one_error(cli(w, 'archive', '--exclude-flagged', old / 'flags.csv', '--out', tmp_path / 'rel_old'), str(old / 'flags.csv'),
              'did not record the sha256', 'run `cxr-pggan audit` again')
    assert _protect(old, arch) == before_old and not (tmp_path / 'rel_old').exists()
    r = cli(w, 'archive', '--exclude-flagged', flags, '--out', tmp_path / 'rel')                 # the untouched archive is released
    assert r.returncode == 0 and 'released 3 of 3' in r.stdout, (r.stdout, r.stderr[-1500:])
    assert {p.name: p.read_bytes() for p in (tmp_path / 'rel' / 'images').iterdir()} == {p.name: p.read_bytes() for p in arch.iterdir()}


@pytest.mark.parametrize('case', ['rotation-too-large', 'shift-too-large'])
def test_audit_alignment_options(ws, tmp_path, case):
    "The aligned DCR's options are checked before any image is read: one line naming the option, the value and the range."
    w, u, sp = ws['root'], ws['user'], ws['root'] / 'splits' / 'splits.csv'
    before = _protect(u, ws['small'])
    opt, needles = {'rotation-too-large': (['--max-rotation', '20'], ['--max-rotation 20.0', 'degrees in [0, 15]']),
                    'shift-too-large': (['--max-shift', '0.3'], ['--max-shift 0.3', '[0, 0.25)'])}[case]
    one_error(cli(w, 'audit', '--train', u, '--holdout', u, '--splits', sp, '--holdout-split', 'test', '--synthetic', ws['small'],
                  '--out', tmp_path / 'out', *opt), *needles)
    assert _protect(u, ws['small']) == before and not (tmp_path / 'out').exists()
