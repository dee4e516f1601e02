"""Stand-ins for Kaggle on the CPU: the fp16 gradient penalty against fp32, activation checkpointing's gradients, fp16
training with loss scaling and exact resume, and the `kaggle` profile on a temporary tree in Kaggle's layout (data found
by its Data_Entry_2017.csv, the official split, a time budget that stops cleanly, resume from a read-only copy)."""
import hashlib, json, os, shutil, stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_pggan import core, loss as L, train as T
from cxr_pggan.core import KAGGLE_KNOBS, derive_profile, resolve_precision, section_params
from cxr_pggan.pggan import Discriminator, Generator, make_config
from test_train import Crash, _sd_equal, crash_at, nih_folder, tiny  # noqa: F401  (nih_folder is a fixture)


def _nets(res=16, seed=0):
    torch.manual_seed(seed)
    cfg = make_config('segal2021', 32, channels=1, latent_dim=16, fmap_base=64, fmap_max=16)
    return cfg, Generator(cfg, res), Discriminator(cfg, res)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _d_step_grads(D, real, fake, prec, scaler=None):
    "Penalty, loss and D's (unscaled) gradients of one critic step, the way `loss.WGANGP` computes them."
    D.zero_grad(set_to_none=True)
    loss, parts = L.d_loss_wgangp(D, real, fake, 10.0, 1e-3, torch.Generator().manual_seed(3),
                                  prec.autocast if prec.dtype is not None else None, scaler=scaler)
    if scaler is None: loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(torch.optim.SGD(D.parameters(), lr=0.0))       # what scaler.step does before the update
    return parts, [p.grad.detach().clone() for p in D.parameters() if p.grad is not None]


def test_fp16_gradient_penalty_matches_fp32():
    """The penalty is taken on the scaled critic output and unscaled before the norm (PyTorch AMP docs, 'gradient penalty').
    (a) In fp32 arithmetic a 2^16 scale must change nothing: penalty and every gradient within 1e-5 (relative).
    (b) Under CPU fp16 autocast, the dynamic scale starting at 2^16 (halved after each overflowed try): penalty and loss
        within 2% of fp32, D's whole gradient within 2% (relative L2), each tensor within 5% (+0.1% of the whole norm, for
        terms that cancel) - the rounding of fp16's 11-bit mantissa; a missing unscale would be off by the scale (>= 2^4)."""
    _, G, D = _nets(16)
    D.set_alpha(0.5)
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    with torch.no_grad(): fake = G(torch.randn(8, 16))
    fp32 = resolve_precision('fp32', 'cpu')
    ref_parts, ref = _d_step_grads(D, real, fake, fp32)
    sc = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16)
    parts, got = _d_step_grads(D, real, fake, fp32, scaler=sc)
    assert abs(float(parts['gp']) - float(ref_parts['gp'])) <= 1e-5 * abs(float(ref_parts['gp']))
    assert len(got) == len(ref) > 0 and max(_rel(a, b) for a, b in zip(got, ref)) <= 1e-5
    fp16 = resolve_precision('fp16', 'cpu', cpu=True)
    sc = fp16.grad_scaler()
    assert sc.is_enabled() and sc.get_scale() == 2.0 ** 16
    for skipped in range(12):                      # as in training: an overflowed step is skipped and the scale halved
        parts, got = _d_step_grads(D, real, fake, fp16, scaler=sc)
        if all(torch.isfinite(g).all() for g in got): break
        sc.update()
    assert all(torch.isfinite(g).all() for g in got) and sc.get_scale() == 2.0 ** (16 - skipped)
    assert abs(float(parts['gp']) - float(ref_parts['gp'])) <= 0.02 * abs(float(ref_parts['gp']))
    assert abs(float(parts['loss_D']) - float(ref_parts['loss_D'])) <= 0.02 * abs(float(ref_parts['loss_D']))
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    assert _rel(flat(got), flat(ref)) <= 0.02                              # the whole gradient of D
    top = float(flat(ref).norm())                                            # each tensor, up to a floor for terms that cancel
    assert all(float((a - b).norm()) <= 0.05 * float(b.norm()) + 1e-3 * top for a, b in zip(got, ref))


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    "A scale so large that the scaled gradients overflow fp16: the update is skipped, D is unchanged, the scale halves."
    _, G, D = _nets(8)
    Ge = Generator(G.cfg, 8); Ge.load_state_dict(G.state_dict()); Ge.requires_grad_(False)
    c = T.TrainConfig(resolution=8, start_resolution=8, latent_dim=16, channels=1)
    prec = resolve_precision('fp16', 'cpu', cpu=True)
    scalers = dict(D=torch.amp.GradScaler('cpu', init_scale=2.0 ** 100), G=torch.amp.GradScaler('cpu', init_scale=2.0 ** 100))
    step = L.WGANGP(G, D, Ge, *T.make_optimizers(G, D), c, torch.device('cpu'), prec=prec, scalers=scalers)
    before = {k: v.clone() for k, v in D.state_dict().items()}
    parts = step(torch.rand(4, 1, 8, 8) * 2 - 1)
    assert parts['skipped_D'] == 1 == step.counters['skipped_D'] and scalers['D'].get_scale() == 2.0 ** 99
    assert _sd_equal(D.state_dict(), before)


def test_checkpointing_gradients_equal():
    "Activation checkpointing in G and D: every gradient of a full WGAN-GP loss (penalty's double backward included) within 1e-6; less saved memory."
    _, G, D = _nets(16)
    for n in (G, D): n.set_alpha(0.5)                               # the fade-in path too
    real, z, z2 = torch.rand(4, 1, 16, 16) * 2 - 1, torch.randn(4, 16), torch.randn(4, 16)
    def grads(on):
        for n in (G, D): n.set_checkpointing(on); n.zero_grad(set_to_none=True)
        loss_D, _ = L.d_loss_wgangp(D, real, G(z), generator=torch.Generator().manual_seed(1))
        (loss_D + L.g_loss_wgan(D, G(z2))).backward()
        return {f'{m}.{k}': p.grad.clone() for m, net in (('G', G), ('D', D)) for k, p in net.named_parameters() if p.grad is not None}
    ref, got = grads(False), grads(True)
    assert ref.keys() == got.keys() and len(ref) > 10
    worst = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert worst <= 1e-6, worst
    saved = {on: T._saved_bytes(lambda: grads(on)) for on in (False, True)}
    assert saved[True] < saved[False], saved


def test_fp16_training_logs_skips_and_resumes_exactly(nih_folder, tmp_path, monkeypatch):
    "fp16 with dynamic loss scaling (CPU autocast standing in for a T4): overflowed steps are counted in the log, and a killed run resumes to the same weights (scaler state in the checkpoint)."
    class Loud(core.Precision):
        def grad_scaler(self, init_scale=2.0 ** 24): return super().grad_scaler(init_scale)   # overflows for the first steps
    def fp16_on_cpu(p, device=None):
        r = core.resolve_precision(p, device, cpu=True)
        return Loud(r.asked, r.dtype, r.scaler, r.device_type, r.label)
    monkeypatch.setattr(T, 'resolve_precision', fp16_on_cpu)
    full = T.train(tiny(nih_folder, tmp_path / 'full', precision='fp16'), quiet=True)
    log = pd.read_csv(full['log_csv'])
    assert full['precision'].startswith('fp16') and full['skipped_steps']['D'] >= 1
    assert log['skipped_D'].max() == full['skipped_steps']['D'] and (log['loss_scale'] < 2.0 ** 24).all()
    ck = torch.load(T.latest_checkpoint(tmp_path / 'full' / 'ckpt'), weights_only=True)
    assert ck['scalers']['D']['scale'] == log['loss_scale'].iloc[-1] and ck['meta']['origin']['precision'].startswith('fp16')
    prov = json.loads(Path(full['final'] + '.provenance.json').read_text())
    assert prov['precision_used'].startswith('fp16') and prov['params']['precision'] == 'fp16'
    P = tiny(nih_folder, tmp_path / 'cut', precision='fp16')
    with pytest.raises(Crash): T.train(P, callbacks=[crash_at(7)], quiet=True)
    res = T.train(P, quiet=True)
    a, b = torch.load(res['final'], weights_only=True), torch.load(full['final'], weights_only=True)
    for k in ('G', 'D', 'G_ema'): assert _sd_equal(a[k], b[k]), k
    assert res['skipped_steps'] == full['skipped_steps']


# ---------------------------------------------------------------- the Kaggle layout

def _files(folder: Path) -> dict:
    "path -> (sha256, mtime_ns, mode) of every file under `folder`: to show a read-only input was never written."
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    "A temporary /kaggle: input/<slug>/ in NIH's Kaggle layout (phantom images in images_00k/images/, the four metadata files)."
    from cxr_pggan.phantom import ensure_phantom
    src = ensure_phantom(64, 64, 0, quiet=True)
    nih = tmp_path / 'kaggle' / 'input' / 'data-nih-chest-xrays'
    meta = pd.read_csv(next(src.glob('Data_Entry_2017*.csv')))
    pngs = sorted(src.rglob('*.png'))
    for i, p in enumerate(pngs):
        d = nih / f'images_{1 + i * 2 // len(pngs):03d}' / 'images'; d.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, d / p.name)
    meta.to_csv(nih / 'Data_Entry_2017.csv', index=False)
    (nih / 'BBox_List_2017.csv').write_text('Image Index,Finding Label,Bbox [x,y,w,h],,,\n'
                                            f"{meta['Image Index'][0]},Atelectasis,225.1,547.0,86.8,79.1\n")
    pids = sorted(meta['Patient ID'].unique())
    test = meta['Patient ID'].isin(pids[int(0.75 * len(pids)):])
    (nih / 'train_val_list.txt').write_text('\n'.join(meta['Image Index'][~test]) + '\n')
    (nih / 'test_list.txt').write_text('\n'.join(meta['Image Index'][test]) + '\n')
    monkeypatch.setenv('KAGGLE_KERNEL_RUN_TYPE', 'Interactive')
    monkeypatch.setenv('CXR_PGGAN_KAGGLE_INPUT', str(tmp_path / 'kaggle' / 'input'))
    monkeypatch.setenv('CXR_PGGAN_KAGGLE_WORKING', str(tmp_path / 'kaggle' / 'working'))
    monkeypatch.delenv('CXR_PGGAN_OUTPUTS', raising=False)
    monkeypatch.delenv('IN_TEST', raising=False)
    derive_profile('kaggle_smoke', 'smoke', **KAGGLE_KNOBS)          # the kaggle overrides on the smoke sizes
    yield dict(root=tmp_path / 'kaggle', nih=nih, meta=meta, test=set(meta['Image Index'][test]))
    core.DERIVED_PROFILES.pop('kaggle_smoke'); core.PROFILES.pop('kaggle_smoke')


@pytest.mark.filterwarnings('ignore:split .* has no image with')      # 64 phantom images: some labels miss a split
def test_kaggle_layout_profile_budget_and_read_only_resume(kaggle, tmp_path, monkeypatch, capsys):
    import time
    from cxr_pggan.experiment import dataset_splits, resolve_dataset
    P = section_params('kaggle_smoke', 'dataset', 'gan')
    assert (P['dataset'], P['split'], P['precision'], P['checkpointing']) == ('kaggle', 'official', 'auto', True)
    # the data: found by its Data_Entry_2017.csv under the input root, images in images_00k/images/
    ds = resolve_dataset(P)
    assert ds.folder == kaggle['nih'] and ds.name == 'nih' and len(ds.frame) == len(kaggle['meta'])
    fr, sp = dataset_splits(ds, 'kaggle_smoke', P['fractions'], P['split_seed'])
    assert set(fr.loc[fr['split'] == 'test', 'Image Index']) == kaggle['test'] and set(fr['split']) == {'train', 'val', 'test'}
    assert sp.is_relative_to(kaggle['root'] / 'working' / 'outputs')              # outputs go to /kaggle/working/outputs
    # session 1: a time budget stops training cleanly, with a checkpoint and a message saying how to continue
    cfg = T.train_config(dict(P, time_budget='3s'))
    assert Path(cfg.checkpoint_dir).is_relative_to(kaggle['root'] / 'working' / 'outputs') and cfg.checkpointing
    t0 = time.time()
    out = T.train(cfg, callbacks=[lambda step, ctx: time.sleep(0.05)], quiet=True)
    took = time.time() - t0
    msg = capsys.readouterr().out
    assert out['stopped'] and out['final'] is None and Path(out['last_checkpoint']).is_file(), out
    assert 0 < out['images_shown'] < T.TrainConfig.from_params(P).schedule()[-1]['end_img']
    assert took > 1.5, took                      # it used the budget before stopping (the stop itself is asserted above, not timed:
                                                 # a loaded CI machine may take longer for its last step and checkpoint)
    assert 'time budget 3s reached' in msg and 'resume_from=' in msg
    # session 2: that output attached read-only; continue from it into a new working folder
    attached = kaggle['root'] / 'input' / 'my-notebook-output'
    shutil.copytree(kaggle['root'] / 'working', attached)
    for p in [attached, *attached.rglob('*')]: p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _files(attached)
    monkeypatch.setenv('CXR_PGGAN_KAGGLE_WORKING', str(kaggle['root'] / 'working2'))
    cfg2 = T.train_config(dict(P, resume_from=str(attached), max_outputs_gib=1e-5))
    res = T.train(cfg2, quiet=True)
    msg = capsys.readouterr().out
    assert f"resuming from {attached}" in msg and 'deleted' in msg                 # the size cap says what it deleted
    assert res['final'] and Path(res['final']).is_relative_to(kaggle['root'] / 'working2')
    assert _files(attached) == before                                             # never written
    log = pd.read_csv(res['log_csv'])
    assert log['step'].is_unique and log['step'].min() < out['steps'] < log['step'].max()  # session 1's log continued
    # the same weights as one uninterrupted run
    monkeypatch.setenv('CXR_PGGAN_KAGGLE_WORKING', str(kaggle['root'] / 'working3'))
    ref = T.train(T.train_config(P), quiet=True)
    a, b = torch.load(res['final'], weights_only=True), torch.load(ref['final'], weights_only=True)
    for k in ('G', 'D', 'G_ema'): assert _sd_equal(a[k], b[k]), k
    for p in [attached, *attached.rglob('*')]: p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_every_section_has_a_kaggle_profile():
    from cxr_pggan.cli import params
    out = params('kaggle')
    assert out['dataset']['dataset'] == 'kaggle' and out['dataset']['split'] == 'official'
    assert out['gan']['precision'] == 'auto' and out['gan']['checkpointing'] and out['gan']['time_budget'] == '11h30m'
    assert out['gan']['batch_sizes'] == section_params('paper', 'gan')['batch_sizes']     # the paper's per-GPU batch
    assert out['gan']['max_outputs_gib'] == 15.0


def test_bench_gan_checkpointing_both_reports_memory(tmp_path):
    rc = T.bench_gan_cli(['--resolutions', '16', '--batch', '2', '--iters', '1', '--warmup', '1', '--fmap-max', '16', '--latent', '16',
                          '--gen-batch', '2', '--gen-iters', '1', '--channels', '1', '--precision', 'auto', '--checkpointing', 'both',
                          '--json', str(tmp_path / 'b.json')])
    assert rc == 0
    b = json.loads((tmp_path / 'b.json').read_text())
    rows = {r['checkpointing']: r for r in b['train']}
    assert b['precision'] == 'fp32' and b['precision_asked'] == 'auto' and set(rows) == {False, True}
    assert 0 < rows[True]['saved_activations_mib'] < rows[False]['saved_activations_mib']


@pytest.mark.slow                                   # 12 s: beyond this file's CI share; run with --slow
def test_classifier_learns_in_fp16_with_loss_scaling(tmp_path, monkeypatch):
    "The classifier's fp16 path (CPU autocast standing in for a T4): the toy set's brighter Cardiomegaly images are learnt as in fp32."
    import warnings
    from cxr_pggan import classifier as C
    from cxr_pggan.latent import random_networks
    monkeypatch.setattr(C, 'resolve_precision', lambda p, d=None: core.resolve_precision(p, d, cpu=True))
    df = C._toy_frame(tmp_path / 'toy', n=120, size=16, seed=3)
    df['split'] = np.where(np.arange(120) < 80, 'train', np.where(np.arange(120) < 100, 'val', 'test'))
    gan, _ = random_networks(tmp_path / 'nets', 16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        r = C.fit_classifier(df, tmp_path / 'd.pt', arch='discriminator', discriminator=gan, epochs=6, batch_size=16,
                             lr=1e-3, n_boot=50, log=lambda *a: None, precision='fp16')
    assert r['precision_used'].startswith('fp16') and all(np.isfinite(h['loss']) for h in r['history'])
    assert r['auc'].set_index('label').auc['Cardiomegaly'] > 0.8, r['auc']
    assert json.loads((tmp_path / 'd.pt.provenance.json').read_text())['params']['precision'] == 'fp16'
