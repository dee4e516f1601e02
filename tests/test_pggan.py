"Tests of cxr_pggan.pggan: reference-checkpoint parity, shapes, fade-in, minibatch std, pickle refusal, CLIs."
import json, os, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_pggan.core import shared_dir
from cxr_pggan import pggan as P

FIX = shared_dir('fixtures', 'pretrained')
needs_fixtures = pytest.mark.skipif(FIX is None, reason='../shared/fixtures/pretrained is absent')


def _tol(ref):  # see the notebook: 1e-5 x max(1, output scale)
    return 1e-5 * max(1.0, ref.abs().max().item())


@needs_fixtures
@pytest.mark.parametrize('sub,fname,trust', [
    ('cxr_pggan_paper_code', 'lightning_checkpoint.pth', False),
    ('cxr_pggan_paper_code', 'generator_only.pth', False),
    ('pytorch_gan_zoo', 'zoo_checkpoint.pt', True)])
def test_reference_outputs(sub, fname, trust):
    ref = torch.load(FIX / sub / 'reference_outputs.pt', weights_only=True)
    pre = P.load_pretrained(FIX / sub / fname, trust_pickle=trust)
    m = pre.meta
    assert m['resolution'] == ref['resolution'] == 32 and m['latent_dim'] == ref['z'].shape[1]
    assert m['channels'] == ref['G'].shape[1]
    assert m['output_range'] == ([0.0, 1.0] if sub == 'cxr_pggan_paper_code' else [-1.0, 1.0])
    if 'channel_depth' in ref: assert pre.config.depths == list(ref['channel_depth'])
    with torch.no_grad():
        assert (pre.G_ema(ref['z']) - ref['G_ema']).abs().max() <= _tol(ref['G_ema'])
        if fname == 'generator_only.pth':
            assert pre.G is None and pre.D is None and m['source_format'].endswith('generator_only')
            return
        assert (pre.G(ref['z']) - ref['G']).abs().max() <= _tol(ref['G'])
        assert (pre.D(ref['D_input']) - ref['D']).abs().max() <= 1e-5


@needs_fixtures
@pytest.mark.parametrize('sub,fname,option,value', [
    ('cxr_pggan_paper_code', 'lightning_checkpoint.pth', 'dense_pixelnorm', True),
    ('cxr_pggan_paper_code', 'lightning_checkpoint.pth', 'from_rgb_act', True),
    ('cxr_pggan_paper_code', 'lightning_checkpoint.pth', 'mbstd_group', 4),
    ('pytorch_gan_zoo', 'zoo_checkpoint.pt', 'mbstd_layout', 'strided'),
    ('pytorch_gan_zoo', 'zoo_checkpoint.pt', 'mbstd_unbiased', False)])
def test_reference_is_sensitive_to_each_option(sub, fname, option, value):
    "Negative control: flipping one architecture option breaks parity by far more than the tolerance."
    ref = torch.load(FIX / sub / 'reference_outputs.pt', weights_only=True)
    pre = P.load_pretrained(FIX / sub / fname, trust_pickle=True)
    cfg = P.PGGANConfig.from_dict({**pre.config.to_dict(), option: value})
    G, D = P.Generator(cfg, 32), P.Discriminator(cfg, 32)
    G.load_state_dict(pre.G.state_dict()); D.load_state_dict(pre.D.state_dict())
    with torch.no_grad():
        err = max((G(ref['z']) - ref['G']).abs().max().item(), (D(ref['D_input']) - ref['D']).abs().max().item())
    assert err > 2e-4, (option, err)  # >= 20x the parity bar


@needs_fixtures
def test_pickle_refused_without_trust():
    with pytest.raises(P.UntrustedPickleError, match='trust_pickle=True') as e:
        P.load_pretrained(FIX / 'pytorch_gan_zoo' / 'zoo_checkpoint.pt')
    assert 'models.utils.config.BaseConfig' in str(e.value)
    assert 'models' not in sys.modules  # the zoo was never imported


def test_unrecognised_and_missing_files(tmp_path):
    torch.save({'foo': torch.zeros(1)}, tmp_path / 'x.pt')
    with pytest.raises(ValueError, match='unrecognised checkpoint'): P.load_pretrained(tmp_path / 'x.pt')
    with pytest.raises(FileNotFoundError, match='no such checkpoint'): P.load_pretrained(tmp_path / 'nope.pt')


@pytest.mark.parametrize('arch', P.ARCHS)
@pytest.mark.parametrize('channels', [1, 3])
def test_shapes_and_growth(arch, channels):
    cfg = P.make_config(arch, 32, channels=channels, latent_dim=16, fmap_base=64, fmap_max=16)
    G, D = P.Generator(cfg), P.Discriminator(cfg)
    z = torch.randn(4, 16)
    for r in (4, 8, 16, 32):
        G.grow_to(r); D.grow_to(r)
        x = G(z)
        assert x.shape == (4, channels, r, r) and D(x).shape == (4, 1)
    with pytest.raises(ValueError, match='cannot grow past'): G.grow()


def test_paper_depth_table():
    assert P.depth_table(1024) == [512, 512, 512, 512, 256, 128, 64, 32, 16]
    cfg = P.make_config('segal2021', 1024, channels=3)
    assert cfg.latent_dim == 512 and cfg.max_resolution == 1024


def test_fade_in_endpoints():
    cfg = P.make_config('karras2018', 16, latent_dim=8, fmap_base=32, fmap_max=8)
    G8, G16 = P.Generator(cfg, 8), P.Generator(cfg, 16)
    G16.load_state_dict({**G16.state_dict(), **G8.state_dict()})
    z = torch.randn(4, 8)
    with torch.no_grad():
        G16.set_alpha(0.0); torch.testing.assert_close(G16(z), F.interpolate(G8(z), scale_factor=2), atol=1e-5, rtol=0)
        G16.set_alpha(1.0); new = G16(z)
        G16.set_alpha(0.25)
        torch.testing.assert_close(G16(z), 0.75 * F.interpolate(G8(z), scale_factor=2) + 0.25 * new, atol=1e-5, rtol=1e-5)
    D8, D16 = P.Discriminator(cfg, 8), P.Discriminator(cfg, 16)
    D16.load_state_dict({**D16.state_dict(), **D8.state_dict()})
    img = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        D16.set_alpha(0.0); torch.testing.assert_close(D16(img), D8(F.avg_pool2d(img, 2)), atol=1e-5, rtol=0)


def test_minibatch_std_groups():
    x = torch.randn(8, 2, 4, 4)
    ref = lambda idx, ub=False: x[idx].var(0, unbiased=ub).add(1e-8).sqrt().mean()
    y = P.MinibatchStd(4)(x)
    assert y.shape == (8, 3, 4, 4)
    torch.testing.assert_close(y[0, 2, 0, 0], ref([0, 2, 4, 6]))
    torch.testing.assert_close(y[1, 2, 0, 0], ref([1, 3, 5, 7]))
    yc = P.MinibatchStd(4, unbiased=True, layout='contiguous')(x)
    torch.testing.assert_close(yc[5, 2, 0, 0], ref([4, 5, 6, 7], True))
    torch.testing.assert_close(P.MinibatchStd(0)(x)[3, 2, 1, 1], ref(list(range(8))))
    torch.testing.assert_close(P.MinibatchStd(2)(x[:1])[0, 2], torch.full((4, 4), 1e-4))  # group of one: sqrt(eps)
    assert (P.MinibatchStd(4)(x[:1]).isfinite()).all()


def test_our_format_roundtrip_weights_only(tmp_path):
    cfg = P.make_config('segal2021', 16, latent_dim=8, fmap_base=32, fmap_max=8)
    G, D = P.Generator(cfg, 16).set_alpha(0.5), P.Discriminator(cfg, 16).set_alpha(0.5)
    P.save_pggan(tmp_path / 'c.pt', cfg, G=G, D=D, G_ema=G, alpha=0.5)
    torch.load(tmp_path / 'c.pt', weights_only=True)  # plain data only
    pre = P.load_pretrained(tmp_path / 'c.pt')
    z = torch.randn(3, 8)
    with torch.no_grad(): torch.testing.assert_close(pre.G(z), G(z))
    assert pre.meta['alpha'] == 0.5 and pre.G.fading


_VERB = {'convert_weights_cli': 'convert-weights', 'generate_cli': 'generate'}

def _run_cli(fn, *argv):
    "Run a verb in-process through `cxr-pggan`'s entry point (test_bad_inputs.in_process); returns a CompletedProcess."
    from test_bad_inputs import in_process
    return in_process([_VERB[fn], *argv], dict(os.environ))


@needs_fixtures
def test_convert_weights_cli(tmp_path):
    src = FIX / 'pytorch_gan_zoo' / 'zoo_checkpoint.pt'
    r = _run_cli('convert_weights_cli', str(src), str(tmp_path / 'z.pt'))
    assert r.returncode == 2 and '--trust-pickle' in r.stderr and not (tmp_path / 'z.pt').exists()
    r = _run_cli('convert_weights_cli', str(src), str(tmp_path / 'z.pt'), '--trust-pickle')
    assert r.returncode == 0, r.stderr
    ck = torch.load(tmp_path / 'z.pt', weights_only=True)  # converted file is pickle-free
    assert ck['format'] == P.FORMAT and ck['meta']['origin']['source_format'] == 'pytorch_gan_zoo'
    prov = json.loads((tmp_path / 'z.pt.provenance.json').read_text())
    assert prov['pretrained_weights']['converted']['sha256']
    ref = torch.load(FIX / 'pytorch_gan_zoo' / 'reference_outputs.pt', weights_only=True)
    pre = P.load_pretrained(tmp_path / 'z.pt')
    with torch.no_grad():
        assert (pre.G_ema(ref['z']) - ref['G_ema']).abs().max() <= _tol(ref['G_ema'])
        assert (pre.D(ref['D_input']) - ref['D']).abs().max() <= 1e-5
    assert pre.meta['output_range'] == [-1.0, 1.0]


def test_generate_cli(tmp_path):
    cfg = P.make_config('segal2021', 8, latent_dim=8, fmap_base=16, fmap_max=8, channels=3)
    P.save_pggan(tmp_path / 'g.pt', cfg, G=P.Generator(cfg, 8), G_ema=P.Generator(cfg, 8))
    r = _run_cli('generate_cli', '--checkpoint', str(tmp_path / 'g.pt'), '--n', '5', '--out', str(tmp_path / 'o'),
                 '--seed', '7', '--truncation', '0.7', '--batch', '2')
    assert r.returncode == 0, r.stderr
    pngs = sorted((tmp_path / 'o').glob('*.png'))
    assert len(pngs) == 5
    from PIL import Image
    im = Image.open(pngs[0]); assert im.size == (8, 8) and im.mode == 'RGB'
    z = np.load(tmp_path / 'o' / 'latents.npy')
    assert z.shape == (5, 8) and np.abs(z).max() <= 0.7
    np.testing.assert_array_equal(z, P.sample_z(5, 8, seed=7, truncation=0.7).numpy())
    prov = json.loads((tmp_path / 'o' / 'latents.npy.provenance.json').read_text())
    assert prov['pretrained_weights']['generator']['network'] == 'G_ema'
    r = _run_cli('generate_cli', '--checkpoint', str(tmp_path / 'missing.pt'), '--n', '1', '--out', str(tmp_path / 'o2'))
    assert r.returncode == 2 and 'no such checkpoint' in r.stderr and len(r.stderr.strip().splitlines()) == 1


@needs_fixtures
def test_lightning_file_with_pickled_hparams(tmp_path, monkeypatch):
    "A paper-code checkpoint as Lightning's own ModelCheckpoint writes it (pickled hparams of classes we do not have)."
    import types
    mod = types.ModuleType('pytorch_lightning.utilities.parsing')
    class AttributeDict(dict): pass
    AttributeDict.__module__, AttributeDict.__qualname__ = mod.__name__, 'AttributeDict'; mod.AttributeDict = AttributeDict
    for name in ('pytorch_lightning', 'pytorch_lightning.utilities', mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else types.ModuleType(name))
    ck = torch.load(FIX / 'cxr_pggan_paper_code' / 'lightning_checkpoint.pth', weights_only=True)
    ck.update(epoch=3, hyper_parameters=AttributeDict(z_dim=64, lr=1e-3))
    torch.save(ck, tmp_path / 'Final_Full_Model.pth')
    for name in ('pytorch_lightning', 'pytorch_lightning.utilities', mod.__name__): monkeypatch.delitem(sys.modules, name)
    with pytest.raises(P.UntrustedPickleError, match='AttributeDict'): P.load_pretrained(tmp_path / 'Final_Full_Model.pth')
    pre = P.load_pretrained(tmp_path / 'Final_Full_Model.pth', trust_pickle=True)
    ref = torch.load(FIX / 'cxr_pggan_paper_code' / 'reference_outputs.pt', weights_only=True)
    with torch.no_grad(): assert (pre.G_ema(ref['z']) - ref['G_ema']).abs().max() <= _tol(ref['G_ema'])
    assert pre.meta['source_format'] == 'cxr_pggan_paper_code/lightning' and pre.meta['output_range'] == [0.0, 1.0]
