"The one owner of experiments: datasets, splits, artifact names, knobs, the paper profile, and an acyclic package."
import ast, json, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

from cxr_pggan.core import PROFILES, PROFILE_NAMES, clear_knobs, knob_names, notebook_params, repo_root, section_params
from cxr_pggan import experiment as E
from cxr_pggan.cli import SECTIONS, params, paper_notebooks

ROOT = repo_root()


def _import_graph() -> dict[str, set[str]]:
    "Module -> the package modules it imports, counting imports inside functions and `from cxr_pggan import x`."
    pkg = ROOT / 'cxr_pggan'
    mods = {p.stem for p in pkg.glob('*.py')}
    graph = {}
    for p in pkg.glob('*.py'):
        if p.stem == '_modidx': continue
        deps = set()
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module is not None:
                if n.level == 1: deps.add(n.module.split('.')[0])
                elif n.module == 'cxr_pggan': deps |= {a.name for a in n.names if a.name in mods}
                elif n.module.startswith('cxr_pggan.'): deps.add(n.module.split('.')[1])
            elif isinstance(n, ast.ImportFrom) and n.level == 1: deps |= {a.name for a in n.names if a.name in mods}
            elif isinstance(n, ast.Import):
                deps |= {a.name.split('.')[1] for a in n.names if a.name.startswith('cxr_pggan.')}
        graph[p.stem] = deps - {p.stem}
    return graph


def test_no_import_cycle():
    g = _import_graph()
    assert g['experiment'] <= {'core', 'data', 'phantom'} and g['metrics'] <= {'core'} and g['core'] == set()
    def reach(a):
        seen, todo = set(), [a]
        while todo:
            for b in g.get(todo.pop(), ()):
                if b not in seen: seen.add(b); todo.append(b)
        return seen
    cycles = sorted((a, b) for a in g for b in g[a] if a in reach(b))
    assert not cycles, f'import cycles (module imports one that imports it back): {cycles}'


def test_cycle_checker_sees_function_level_imports(tmp_path):
    src = "def f():\n    from cxr_pggan.archive import x\n"
    assert any(isinstance(n, ast.ImportFrom) and n.module == 'cxr_pggan.archive' for n in ast.walk(ast.parse(src)))


def test_dataset_is_one_shared_section():
    params('smoke')                                        # imports every module that registers a section
    assert set(PROFILES['smoke']) >= set(SECTIONS)
    ds_knobs = set(PROFILES['smoke']['dataset'])
    for s in SECTIONS:
        if s == 'dataset': continue
        assert not ds_knobs & set(PROFILES['smoke'][s]), f"section {s} repeats dataset knobs {ds_knobs & set(PROFILES['smoke'][s])}"
        assert not {'phantom_n', 'phantom_size', 'phantom_enrich', 'real', 'data', 'images'} & set(PROFILES['smoke'][s]), s


def test_paper_profile_is_the_paper():
    out = json.loads(subprocess.run([sys.executable, '-m', 'cxr_pggan', 'params', '--profile', 'paper', '--json'],
                                    capture_output=True, text=True, check=True).stdout)
    gan = out['gan']
    assert gan['precision'] == 'fp32' and gan['adam_eps'] == 1e-7 and gan['fade_reals'] is False
    assert gan['batch_sizes'] == [16, 16, 16, 16, 16, 16, 14, 8, 3] and gan['resolution'] == 1024 and gan['channels'] == 3
    sched = out['gan_schedule']
    assert sched[0] == dict(resolution=4, kind='stabilise', kimg=800.0, batch=16, end_kimg=800.0)
    for r in (8, 16, 32, 64, 128, 256, 512):
        assert [p['kimg'] for p in sched if p['resolution'] == r] == [800.0, 800.0]
    assert [(p['kind'], p['kimg']) for p in sched if p['resolution'] == 1024] == [('fade', 800.0), ('stabilise', 1200.0)]   # 2M at 1024²
    assert out['latent']['normalise'] is False
    assert out['archive']['exclusive'] is False and out['archive']['match_reference'] is False and out['archive']['normalise'] is False
    assert out['fid']['n_synthetic'] == 100_000 and out['prevalence']['n_synthetic'] == 130_000
    assert out['prevalence']['classifier'] == 'auto' and out['dataset']['dataset'] == 'nih'
    assert 'image_list' in out['classifier']
    # the archive is as large as the real NIH training split
    from cxr_pggan.data import load_metadata, patient_split
    nih = load_metadata()
    train = int((patient_split(nih, out['dataset']['fractions'], seed=out['dataset']['split_seed']) == 'train').sum())
    assert out['archive']['n'] == train


def test_params_text_and_errors():
    r = subprocess.run([sys.executable, '-m', 'cxr_pggan', 'params', '--profile', 'demo', '--section', 'gan'], capture_output=True, text=True)
    assert r.returncode == 0 and '[gan schedule]' in r.stdout and 'kimg_last' in r.stdout and '66.0' in r.stdout
    r = subprocess.run([sys.executable, '-m', 'cxr_pggan', 'params', '--section', 'nope'], capture_output=True, text=True)
    assert r.returncode == 2 and 'nope' in r.stderr and 'Traceback' not in r.stderr


def test_every_knob_settable_through_papermill():
    "Each paper notebook: the parameters cell holds only `profile`; knobs are cleared before it and collected after it."
    for nb in paper_notebooks(ROOT / 'nbs'):
        cells = [c for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
        i = next(k for k, c in enumerate(cells) if 'parameters' in c.get('metadata', {}).get('tags', []))
        par = [l for l in ''.join(cells[i]['source']).splitlines() if l.strip() and not l.strip().startswith('#')]
        assert len(par) == 1 and par[0].startswith("profile = 'smoke'"), f'{nb.name}: parameters cell {par}'
        assert 'clear_knobs(globals()' in ''.join(cells[i - 1]['source']), nb.name
        assert 'notebook_params(profile' in ''.join(cells[i + 1]['source']), nb.name


def test_no_issue_numbers_in_notebooks_or_code():
    import re
    for p in list((ROOT / 'nbs').glob('*.ipynb')) + list((ROOT / 'cxr_pggan').glob('*.py')):
        text = p.read_text()
        assert not re.search(r'\b(issue|task)( item)? #?\d', text, re.I), f'{p.name} mentions an issue/task number'


def test_knob_overrides_and_clearing():
    ns = dict(lr=0.5, kimg_last='7', other=1)
    assert sorted(clear_knobs(ns, 'dataset', 'gan')) == ['kimg_last', 'lr'] and ns == dict(other=1)
    ns = dict(lr=5e-4, batch_sizes='[8, 8]', dataset='/x')
    P = notebook_params('demo', 'dataset', 'gan', ns=ns)
    assert P['lr'] == 5e-4 and P['batch_sizes'] == [8, 8] and P['dataset'] == '/x' and P['resolution'] == 32
    with pytest.raises(ValueError, match='defined by both'): knob_names('gan', 'gan')


def test_artifacts_and_find(tmp_path, monkeypatch):
    monkeypatch.setenv('CXR_PGGAN_OUTPUTS', str(tmp_path))
    assert E.artifact('classifier', 'demo') == tmp_path / 'checkpoints' / 'classifier_densenet121_demo.pt'
    assert E.find_artifact('auto', 'classifier', 'demo', required=False) is None
    with pytest.raises(FileNotFoundError, match='07_classifier'): E.find_artifact('auto', 'classifier', 'demo')
    E.artifact('archive', 'demo').mkdir(parents=True)
    assert E.find_artifact('auto', 'archive', 'demo') == tmp_path / 'archive' / 'archive_demo'
    assert E.find_artifact(str(tmp_path / 'archive'), 'archive', 'demo') == tmp_path / 'archive'
    with pytest.raises(KeyError, match='unknown artifact'): E.artifact('nope', 'demo')


def test_dataset_resolution_and_shared_split(tmp_path, monkeypatch):
    monkeypatch.setenv('CXR_PGGAN_OUTPUTS', str(tmp_path))
    P = section_params('smoke', 'dataset')
    ds = E.resolve_dataset(P)
    assert ds.kind == 'phantom' and ds.has_images and len(ds.frame) == P['phantom_n']
    fr, path = E.dataset_splits(ds, 'smoke', P['fractions'], P['split_seed'])
    assert path == E.artifact('splits', 'smoke', 'phantom') and set(fr['split']) == {'train', 'val', 'test'}
    # a user folder in the NIH layout is a dataset too, and gets its own split artifact
    own = E.resolve_dataset(dict(P, dataset=str(ds.folder)))
    fr2, p2 = E.dataset_splits(own, 'smoke', P['fractions'], P['split_seed'])
    assert own.kind == 'folder' and p2 != path and (fr2['split'].to_numpy() == fr['split'].to_numpy()).all()
    # the split written by one notebook is read back by the next (not rewritten) while it fits
    mtime = path.stat().st_mtime_ns
    E.dataset_splits(ds, 'smoke', P['fractions'], P['split_seed'])
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError, match='no such folder'): E.resolve_dataset(dict(P, dataset=str(tmp_path / 'none')))
    with pytest.raises(ValueError, match="'phantom', 'nih'"): E.resolve_dataset(dict(P, dataset=''))


def test_nih_without_pixels_is_metadata_only(tmp_path, monkeypatch):
    monkeypatch.setenv('CXR_PGGAN_DATA', str(tmp_path))
    P = section_params('paper', 'dataset')
    ds = E.resolve_dataset(P, images=None)
    assert ds.kind == 'nih' and not ds.has_images and len(ds.frame) == 112120
    with pytest.raises(FileNotFoundError, match='no images under'): E.resolve_dataset(P)


def test_two_folders_of_one_name_keep_their_own_splits(tmp_path, monkeypatch):
    "Two sites' folders both called 'cohort': each dataset's splits file is named by its identity, so neither overwrites the other."
    monkeypatch.setenv('CXR_PGGAN_OUTPUTS', str(tmp_path / 'outputs'))
    P = section_params('smoke', 'dataset')
    meta = pd.read_csv(E.resolve_dataset(P, images=None).metadata)
    folders = [tmp_path / site / 'cohort' for site in ('site_a', 'site_b')]
    for k, f in enumerate(folders):
        f.mkdir(parents=True); meta.iloc[k::2].to_csv(f / 'Data_Entry_2017.csv', index=False)
    dss = [E.resolve_dataset(dict(P, dataset=str(f)), images=None) for f in folders]
    paths = [E.dataset_splits(d, 'smoke', P['fractions'], P['split_seed'])[1] for d in dss]
    assert paths[0] != paths[1] and all(p.parent.name.startswith('cohort-') and p.parent.name.endswith('_smoke') for p in paths)
    stamps = [p.stat().st_mtime_ns for p in paths]
    for d in dss: E.dataset_splits(d, 'smoke', P['fractions'], P['split_seed'])        # each read back, none rewritten
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    assert E.splits_name(dss[0]) == E.splits_name(E.resolve_dataset(dict(P, dataset=str(folders[0])), images=None))   # stable
