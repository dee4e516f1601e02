"Tests of cxr_pggan.train: exact resume, NaN stop, checkpoints, DDP with 2 gloo processes, bench and train CLIs."
import hashlib, json, os, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_pggan.core import section_params
from cxr_pggan import train as T
from cxr_pggan.pggan import load_pretrained


@pytest.fixture(scope='module')
def nih_folder(tmp_path_factory):
    "16 small PNGs in the NIH layout (images/ + Data_Entry_2017.csv with the NIH columns)."
    from PIL import Image
    root = tmp_path_factory.mktemp('nih'); (root / 'images').mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    rows = []
    for i in range(16):
        cx, cy, r = rng.uniform(.3, .7, 2).tolist() + [rng.uniform(.15, .3)]
        img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)) * .8 + .1 * rng.random((32, 32))
        name = f'{i:08d}_000.png'
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / 'images' / name)
        rows.append(f'{name},No Finding,0,{i},{40 + i},{"MF"[i % 2]},PA')
    (root / 'Data_Entry_2017.csv').write_text('Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,View Position\n'
                                              + '\n'.join(rows) + '\n')
    return root


def tiny(data, out, **kw):
    "8² -> 16² in 16 steps of 8 images: 4 at 8², 4 fading in 16², 8 at 16²; checkpoints every 24 images."
    P = T.TrainConfig.from_params(section_params('smoke', 'gan')).to_dict()
    P.update(data=str(data), resolution=16, start_resolution=8, latent_dim=16, fmap_base=32, fmap_max=16, kimg_stab=0.032,
             kimg_fade=0.032, kimg_last=0.064, batch_sizes=[8], checkpoint_kimg=0.024, keep_checkpoints=10,
             sample_kimg=0.064, log_every=2, n_samples=4, checkpoint_dir=str(out / 'ckpt'), sample_dir=str(out / 'samples'),
             run='test', device='cpu', train_split='all')
    P.update(kw)
    return P


class Crash(RuntimeError): pass


def crash_at(n):
    def cb(step, ctx):
        if step == n: raise Crash(f'simulated kill at step {n}')
    return cb


def _sd_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope='module')
def uninterrupted(nih_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('full')
    res = T.train(tiny(nih_folder, out), quiet=True)
    return res, torch.load(res['final'], weights_only=True), out


@pytest.mark.parametrize('kill_step', [5, 7])  # 5: resume from the 8² phase end (growth after resume); 7: mid fade
def test_kill_and_resume_is_exact(nih_folder, tmp_path, uninterrupted, kill_step):
    full, ref, _ = uninterrupted
    P = tiny(nih_folder, tmp_path)
    with pytest.raises(Crash): T.train(P, callbacks=[crash_at(kill_step)], quiet=True)
    ck = T.latest_checkpoint(tmp_path / 'ckpt')
    assert ck is not None and torch.load(ck, weights_only=True)['state']['step'] < kill_step
    res = T.train(P, quiet=True)                                   # resume='auto'
    assert res['images_shown'] == full['images_shown'] == 128 and res['steps'] == 16
    got = torch.load(res['final'], weights_only=True)
    for k in ('G', 'D', 'G_ema'): assert _sd_equal(got[k], ref[k]), k
    last_full = torch.load(T.latest_checkpoint(uninterrupted[2] / 'ckpt'), weights_only=True)
    last_res = torch.load(T.latest_checkpoint(tmp_path / 'ckpt'), weights_only=True)
    for opt in ('optim_G', 'optim_D'):
        sf, sr = last_full[opt]['state'], last_res[opt]['state']
        assert sf.keys() == sr.keys() and all(torch.equal(sf[i][m], sr[i][m]) for i in sf for m in ('exp_avg', 'exp_avg_sq'))
    import pandas as pd
    log = pd.read_csv(res['log_csv'])
    assert log['step'].is_unique and log['step'].max() == 16      # rows after the checkpoint were dropped, not duplicated


def test_checkpoint_contents_and_keep_last_k(nih_folder, tmp_path, uninterrupted):
    full, _, out = uninterrupted
    cks = T.list_checkpoints(out / 'ckpt')
    ck = torch.load(cks[-1], weights_only=True)                     # plain data only
    assert {'G', 'D', 'G_ema', 'optim_G', 'optim_D', 'state', 'rng', 'train_config', 'config'} <= set(ck)
    assert ck['state']['fixed_z'].shape == (4, 16) and len(ck['rng']['noise']) == 1
    json.dumps(ck['train_config']); json.dumps(ck['config'])
    pre = load_pretrained(cks[-1])                                  # training checkpoints are model files too
    assert pre.meta['resolution'] == 16 and pre.G_ema is not None
    # keep-last-K: same run with keep=2 leaves two
    res = T.train(tiny(nih_folder, tmp_path, keep_checkpoints=2), quiet=True)
    names = [p.name for p in T.list_checkpoints(tmp_path / 'ckpt')]
    assert names == ['ckpt_000000000120.pt', 'ckpt_000000000128.pt']
    assert (tmp_path / 'ckpt' / 'ckpt_000000000128.pt.provenance.json').exists()
    assert len(list((tmp_path / 'samples').glob('*.png'))) >= 2 and res['final']


def test_checkpoint_write_is_atomic(nih_folder, tmp_path, monkeypatch, uninterrupted):
    _, _, out = uninterrupted
    src = T.latest_checkpoint(out / 'ckpt')
    ck = torch.load(src, weights_only=True)
    pre = load_pretrained(src)
    opt_G, opt_D = T.make_optimizers(pre.G, pre.D)
    real_save = torch.save
    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b'partial'); raise OSError('disk full (simulated)')
    monkeypatch.setattr(torch, 'save', broken_save)
    folder = tmp_path / 'ck'; folder.mkdir()
    (folder / 'ckpt_000000000001.pt').write_bytes(b'older')
    state = dict(ck['state'], images_shown=999)
    with pytest.raises(OSError, match='disk full'):
        T.save_train_checkpoint(folder, pre.config, pre.G, pre.D, pre.G_ema, opt_G, opt_D, state, ck['rng']['noise'], {}, keep=1)
    assert sorted(p.name for p in folder.iterdir()) == ['ckpt_000000000001.pt']  # no partial file, older one kept
    monkeypatch.setattr(torch, 'save', real_save)
    T.save_train_checkpoint(folder, pre.config, pre.G, pre.D, pre.G_ema, opt_G, opt_D, state, ck['rng']['noise'], {}, keep=1)
    assert sorted(p.name for p in folder.iterdir()) == ['ckpt_000000000999.pt']


def test_nan_stops_with_step_and_keeps_last_good(nih_folder, tmp_path):
    def poison(step, ctx):
        if step == 7:
            with torch.no_grad(): ctx['G'].dense.weight.fill_(float('nan'))
    with pytest.raises(T.NonFiniteLossError, match=r'at step 8 .*Last good checkpoint: .*ckpt_000000000048\.pt'):
        T.train(tiny(nih_folder, tmp_path), callbacks=[poison], quiet=True)
    cks = T.list_checkpoints(tmp_path / 'ckpt')
    assert cks[-1].name == 'ckpt_000000000048.pt'                    # nothing written after the NaN
    ck = torch.load(cks[-1], weights_only=True)
    assert all(t.isfinite().all() for t in ck['G'].values())
    assert not (tmp_path / 'ckpt' / 'final.pt').exists()


def test_resume_refuses_other_architecture(nih_folder, tmp_path):
    T.train(tiny(nih_folder, tmp_path, kimg_last=0.016), quiet=True)
    with pytest.raises(ValueError, match='cannot resume'):
        T.train(tiny(nih_folder, tmp_path, latent_dim=32), quiet=True)


def test_train_split_reads_only_that_split_and_is_recorded(nih_folder, tmp_path):
    "train_split='train': only the train split's images are read; model files record it; resuming with another split is refused."
    import pandas as pd
    sp = pd.DataFrame({'Image Index': [f'{i:08d}_000.png' for i in range(16)], 'Patient ID': range(16),
                       'split': ['train'] * 10 + ['val'] * 3 + ['test'] * 3})
    sp.to_csv(tmp_path / 'splits.csv', index=False)
    sha = hashlib.sha256((tmp_path / 'splits.csv').read_bytes()).hexdigest()
    P = tiny(nih_folder, tmp_path, kimg_last=0.016, train_split='train', splits=str(tmp_path / 'splits.csv'))
    seen = []
    orig = T.RealImages.__init__
    def spy(self, df, *a, **k): seen.extend(df['path']); orig(self, df, *a, **k)
    T.RealImages.__init__ = spy
    try: res = T.train(P, quiet=True)
    finally: T.RealImages.__init__ = orig
    names = {Path(p).name for p in seen}
    assert names == set(sp.loc[sp.split == 'train', 'Image Index']) and res['n_images'] == 10   # no val or test image read
    rec = dict(name='train', splits=str(tmp_path / 'splits.csv'), sha256=sha, images=10)
    assert res['train_split'] == rec
    assert load_pretrained(res['final']).meta['origin']['train_split'] == rec                  # what archives and audits read
    for f in (res['final'], str(T.latest_checkpoint(tmp_path / 'ckpt'))):
        prov = json.loads(Path(f + '.provenance.json').read_text())
        assert prov['train_split'] == rec and prov['params']['train_split'] == 'train'
        assert prov['inputs']['splits']['sha256'] == sha
    with pytest.raises(ValueError, match=r"cannot resume, it was trained on train_split='train' and this run asks for 'all'") as e:
        T.train(dict(P, train_split='all', kimg_last=0.032), quiet=True)
    assert '\n' not in str(e.value)
    sp.assign(split=['train'] * 9 + ['val'] * 4 + ['test'] * 3).to_csv(tmp_path / 'splits.csv', index=False)   # the split file changed
    with pytest.raises(ValueError, match=r"cannot resume, the splits file .*splits\.csv changed since this checkpoint"):
        T.train(dict(P, kimg_last=0.032), quiet=True)
    with pytest.raises(ValueError, match=r"train_split='tset': no such split .*known splits: test, train, val"):
        T.train(dict(P, train_split='tset', run='other', checkpoint_dir=str(tmp_path / 'c2'), sample_dir=str(tmp_path / 's2')), quiet=True)


DDP_SCRIPT = textwrap.dedent('''
    import hashlib, json, sys, torch
    from pathlib import Path
    from cxr_pggan import train as T
    P = json.loads(open(sys.argv[1]).read()); out = Path(sys.argv[2])
    # each rank reports to its own file: torchrun interleaves the workers' stdout
    def digest(step, ctx):
        if ctx['state']['images_shown'] >= 128:
            h = hashlib.sha256(b''.join(t.detach().numpy().tobytes() for t in ctx['G_ema'].state_dict().values())).hexdigest()
            (out / f"rank{ctx['rank']}.txt").write_text(f"RANK{ctx['rank']} {h} {ctx['state']['images_shown']}")
    res = T.train(P, callbacks=[digest], quiet=True)
    (out / f"done{res['rank']}.txt").write_text(f"DONE{res['rank']} world={res['world']} final={res['final']}")
''')


def test_ddp_two_processes_gloo(nih_folder, tmp_path):
    # per-process batch 4 x 2 processes = global batch 8, so the schedule is the same 16 steps
    P = tiny(nih_folder, tmp_path, batch_sizes=[4], checkpoint_kimg=0)
    (tmp_path / 'p.json').write_text(json.dumps(P)); (tmp_path / 'ddp.py').write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS='1', TQDM_DISABLE='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(tmp_path / 'ddp.py'), str(tmp_path / 'p.json'), str(tmp_path)], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [(tmp_path / f'rank{k}.txt').read_text().split() for k in (0, 1) if (tmp_path / f'rank{k}.txt').exists()]
    assert sorted(l[0] for l in lines) == ['RANK0', 'RANK1']
    assert lines[0][1] == lines[1][1]                                 # identical EMA weights on both ranks
    assert all(l[2] == '128' for l in lines)                          # images shown counts both processes
    assert (tmp_path / 'done1.txt').read_text() == 'DONE1 world=2 final=None'   # only rank 0 writes
    ck = torch.load(T.latest_checkpoint(tmp_path / 'ckpt'), weights_only=True)
    assert len(ck['rng']['noise']) == 2 and ck['state']['step'] == 16


def test_bench_cli_tiny(tmp_path):
    rc = T.bench_gan_cli(['--resolutions', '8', '16', '--batch', '2', '--iters', '2', '--warmup', '1', '--fmap-max', '16',
                      '--latent', '16', '--gen-batch', '2', '--gen-iters', '1', '--channels', '1', '--json', str(tmp_path / 'b.json')])
    assert rc == 0
    b = json.loads((tmp_path / 'b.json').read_text())
    assert [r['resolution'] for r in b['train']] == [8, 16] and all(r['train_img_per_s'] > 0 for r in b['train'])
    assert b['generate']['resolution'] == 16 and b['generate']['img_per_s'] > 0 and b['device_type'] == 'cpu'
    from cxr_pggan.cli import bench_cli
    assert bench_cli(['nope']) == 2


def test_train_cli_bad_override(capsys):
    from cxr_pggan.cli import main
    assert main(['train', '--profile', 'smoke', '--set', 'no_such_param=1']) == 2
    err = capsys.readouterr().err
    assert 'no_such_param' in err and len(err.strip().splitlines()) == 1


KILL_SCRIPT = textwrap.dedent('''
    import json, sys, time
    from cxr_pggan import train as T
    P = json.loads(open(sys.argv[1]).read())
    slow = float(sys.argv[2])
    T.train(P, callbacks=[lambda step, ctx: time.sleep(slow)], quiet=True)
''')


@pytest.mark.slow
def test_sigkill_and_resume_is_exact(nih_folder, tmp_path, uninterrupted):
    "A real SIGKILL of a training process, then resume: same final weights as the uninterrupted run."
    import signal, time
    _, ref, _ = uninterrupted
    P = tiny(nih_folder, tmp_path)
    (tmp_path / 'p.json').write_text(json.dumps(P)); (tmp_path / 'k.py').write_text(KILL_SCRIPT)
    env = dict(os.environ, TQDM_DISABLE='1', OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, str(tmp_path / 'k.py'), str(tmp_path / 'p.json'), '0.3'], env=env)
    t0 = time.time()
    while time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.2)
        if (tmp_path / 'ckpt').exists() and len(T.list_checkpoints(tmp_path / 'ckpt')) >= 2: break
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert not (tmp_path / 'ckpt' / 'final.pt').exists()
    res = T.train(P, quiet=True)
    got = torch.load(res['final'], weights_only=True)
    for k in ('G', 'D', 'G_ema'): assert _sd_equal(got[k], ref[k]), k


def test_resume_from_a_read_only_folder_is_exact(nih_folder, tmp_path, uninterrupted):
    "Killed in folder A; A made read-only (an attached Kaggle output); continued into folder B with resume_from=A: the same weights, A unchanged."
    import stat
    _, ref, _ = uninterrupted
    with pytest.raises(Crash): T.train(tiny(nih_folder, tmp_path / 'A'), callbacks=[crash_at(7)], quiet=True)
    A = tmp_path / 'A'
    snap = lambda: {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(A.rglob('*')) if p.is_file()}
    for p in [A, *A.rglob('*')]: p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = snap()
    res = T.train(tiny(nih_folder, tmp_path / 'B', resume_from=str(A)), quiet=True)
    assert snap() == before and Path(res['final']).is_relative_to(tmp_path / 'B')
    got = torch.load(res['final'], weights_only=True)
    for k in ('G', 'D', 'G_ema'): assert _sd_equal(got[k], ref[k]), k
    for p in [A, *A.rglob('*')]: p.chmod(p.stat().st_mode | stat.S_IWUSR)


@pytest.mark.slow
def test_train_starts_its_own_workers(nih_folder, tmp_path):
    "processes=2 from a plain call (what the notebook does on 2xT4): two gloo workers under torchrun, rank 0's summary back."
    P = tiny(nih_folder, tmp_path, batch_sizes=[4], checkpoint_kimg=0, processes=2)
    res = T.train(P, quiet=True)
    assert res['world'] == 2 and res['images_shown'] == 128 and Path(res['final']).is_file()
    assert len(torch.load(T.latest_checkpoint(tmp_path / 'ckpt'), weights_only=True)['rng']['noise']) == 2
