"""The DCGAN (`TrainConfig.model='dcgan'`, Figure 4): exact resume, its checkpoint in every generator consumer, its knobs in
`params` and `bench gan`, and bad values of its knobs through the real command line (one line, exit 2, no file changed)."""
import json

import numpy as np
import pytest
import torch

from cxr_pggan import train as T
from cxr_pggan.core import section_params
from cxr_pggan.pggan import DCGANDiscriminator, DCGANGenerator, as_image_generator, generate, load_pretrained, sample_z
from test_bad_inputs import cli, one_error, tree
from test_train import Crash, _sd_equal, crash_at, nih_folder  # noqa: F401  (nih_folder is a fixture)


def tiny_dc(data, out, **kw):
    "A DCGAN at 16² in 16 steps of 8 images (one phase); checkpoints every 24 images."
    P = T.TrainConfig.from_params(T.dcgan_params(section_params('smoke', 'gan', 'dcgan'))).to_dict()
    P.update(data=str(data), resolution=16, start_resolution=16, latent_dim=16, width=4, fmap_max=16, kimg_last=0.128, batch_sizes=[8],
             checkpoint_kimg=0.024, keep_checkpoints=10, sample_kimg=0.064, log_every=2, n_samples=4, checkpoint_dir=str(out / 'ckpt'),
             sample_dir=str(out / 'samples'), run='test_dcgan', device='cpu', train_split='all')
    P.update(kw)
    return P


@pytest.fixture(scope='module')
def dc_full(nih_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('dc_full')
    res = T.train(tiny_dc(nih_folder, out), quiet=True)
    return res, torch.load(res['final'], weights_only=True), out


def test_dcgan_trains_one_phase_with_its_loss(dc_full):
    res, ck, _ = dc_full
    assert res['images_shown'] == 128 and res['steps'] == 16
    assert ck['config']['model'] == 'dcgan' and ck['meta']['arch'] == 'dcgan' and ck['meta']['origin']['trained_by'] == 'cxr_pggan.train'
    assert any(k.endswith('running_mean') for k in ck['G_ema'])                    # BatchNorm statistics travel with the EMA G
    assert all(np.isfinite(v) for v in res['last'].values()) and set(res['last']) == {'loss_D', 'loss_G', 'wdist'}   # non-saturating


def test_dcgan_kill_and_resume_is_exact(nih_folder, tmp_path, dc_full):
    full, ref, _ = dc_full
    P = tiny_dc(nih_folder, tmp_path)
    with pytest.raises(Crash): T.train(P, callbacks=[crash_at(7)], quiet=True)
    assert torch.load(T.latest_checkpoint(tmp_path / 'ckpt'), weights_only=True)['state']['step'] < 7
    res = T.train(P, quiet=True)                                                      # resume='auto'
    assert res['images_shown'] == full['images_shown'] and res['steps'] == 16
    got = torch.load(res['final'], weights_only=True)
    for k in ('G', 'D', 'G_ema'): assert _sd_equal(got[k], ref[k]), k             # weights and BatchNorm buffers, bit for bit


def test_dcgan_resume_refuses_a_pggan_checkpoint(nih_folder, tmp_path, dc_full):
    _, _, out = dc_full
    P = tiny_dc(nih_folder, tmp_path, model='pggan', start_resolution=8, resume=str(T.latest_checkpoint(out / 'ckpt')))
    with pytest.raises(ValueError, match='cannot resume'): T.train(P, quiet=True)


def test_dcgan_wgangp_has_no_batchnorm_in_d(nih_folder, tmp_path):
    res = T.train(tiny_dc(nih_folder, tmp_path, loss='wgangp', kimg_last=0.016, checkpoint_kimg=0), quiet=True)
    pre = load_pretrained(res['final'])
    assert pre.config.d_norm == 'none' and not any(isinstance(m, torch.nn.BatchNorm2d) for m in pre.D.modules())
    assert {'gp', 'drift'} <= set(res['last'])


def test_dcgan_checkpoint_in_every_generator_consumer(dc_full, tmp_path):
    "A DCGAN file goes where a PGGAN file goes: load_pretrained, as_image_generator, generate, Algorithm 1, the image sets of FID, the archive."
    res, _, _ = dc_full
    pre = load_pretrained(res['final'])
    assert isinstance(pre.G_ema, DCGANGenerator) and isinstance(pre.D, DCGANDiscriminator)
    IG = as_image_generator(res['final'])
    with torch.no_grad(): x = IG(sample_z(3, 16, seed=1))
    assert x.shape == (3, 1, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1 and IG.weights['network'] == 'G_ema'
    info = generate(res['final'], 4, tmp_path / 'png', seed=2)
    assert info['files'] == 4 and len(list((tmp_path / 'png').glob('synthetic_*.png'))) == 4
    from cxr_pggan.latent import optimise_class, random_networks
    from cxr_pggan.classifier import load_classifier
    _, cp = random_networks(tmp_path / 'nets', 16)
    r = optimise_class(IG, load_classifier(cp), 'Cardiomegaly', n=2, steps=3, seed=0, device='cpu')
    assert r.z.shape == (2, 16) and len(r.converged) == 2 and torch.isfinite(r.logit).all()
    from cxr_pggan.features import image_set
    s = image_set(res['final'], 4)
    assert s['kind'] == 'generator' and s['resolution'] == 16
    from cxr_pggan.archive import build_archive
    arc = build_archive(res['final'], cp, 3, tmp_path / 'archive', images_per_patient=3, steps=3, candidates=2, max_attempts=1,
                        device='cpu', exclusive=False)
    assert arc['complete'] and arc['images'] == 3 == len(list((tmp_path / 'archive').rglob('*.png')))


def test_params_and_bench_show_the_dcgan():
    from cxr_pggan.cli import params
    out = params('demo', ['gan', 'dcgan'])
    assert out['dcgan']['dcgan_lr'] == 2e-4 and out['dcgan']['dcgan_betas'] == [0.5, 0.999]
    assert out['dcgan_schedule'] == [dict(resolution=32, kind='stabilise', kimg=66.0, batch=64, end_kimg=66.0)]
    b = T.bench_gan([8, 16], batch=2, iters=1, warmup=1, channels=1, precision='fp32', device='cpu', gen_batch=2, gen_iters=1,
                    fmap_max=8, latent_dim=8, quiet=True, model='dcgan', width=4)
    assert b['model'] == 'dcgan' and [r['resolution'] for r in b['train']] == [8, 16] and all(r['loss'] == 'nonsat' for r in b['train'])
    with pytest.raises(ValueError, match="resolution=4: must be a power of two >= 8 for model='dcgan'"):
        T.bench_gan([4], model='dcgan', device='cpu', quiet=True)
    with pytest.raises(ValueError, match="model='vae': must be one of pggan, dcgan"): T.TrainConfig(model='vae')


@pytest.mark.parametrize('args, needles', [
    (['train', '--profile', 'smoke', '--model', 'stylegan'], ['--model', "invalid choice: 'stylegan'"]),
    (['train', '--profile', 'smoke', '--model', 'dcgan', '--set', 'dcgan_resolution=4'], ["resolution=4", "model='dcgan'"]),
    (['train', '--profile', 'smoke', '--model', 'dcgan', '--set', 'dcgan_loss=hinge'], ["loss='hinge'", 'nonsat']),
])
def test_bad_dcgan_knobs_via_the_cli(tmp_path, args, needles):
    ws = tmp_path; (ws / 'outputs').mkdir(); (ws / 'outputs' / 'keep.txt').write_text('mine')
    before = tree(ws)
    one_error(cli(ws, *args), *needles)
    assert tree(ws) == before


def test_dcgan_encoder_and_discriminator_classifier(dc_full, tmp_path):
    """The encoder of a DCGAN (train-encoder, embed) works, started from random weights and saying so (its D is not the
    PGGAN discriminator the encoder is built on); the discriminator classifier refuses a DCGAN in one line."""
    res, _, _ = dc_full
    from cxr_pggan.synthetic import load_encoder, train_encoder
    with pytest.warns(UserWarning, match='is a DCGAN.*RANDOM weights'):
        train_encoder(res['final'], tmp_path / 'enc.pt', steps=2, batch_size=4, heldout=4, device='cpu', log=lambda *a: None)
    E, rec = load_encoder(tmp_path / 'enc.pt', res['final'])
    assert rec['resolution'] == 16 and rec['latent_dim'] == 16 and E(torch.rand(2, 1, 16, 16)).shape == (2, 16)
    ws = tmp_path / 'ws'; (ws / 'outputs').mkdir(parents=True)
    one_error(cli(ws, 'train-classifier', '--arch', 'discriminator', '--discriminator', res['final'], '--profile', 'smoke',
                  '--out', tmp_path / 'dclf.pt'), 'a DCGAN checkpoint', '--arch densenet121')
