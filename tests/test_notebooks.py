"Repository shape: notebooks runnable by papermill as they are, profiles complete, CLI verbs wired."
import json, subprocess, sys
from pathlib import Path

import pytest

from cxr_pggan.cli import BENCHES, VERBS, _resolve, paper_notebooks
from cxr_pggan.core import PROFILE_NAMES, PROFILES, repo_root

ROOT = repo_root()
NBS = sorted((ROOT / 'nbs').glob('[0-9]*.ipynb'))


def cells(p): return json.loads(p.read_text(encoding='utf-8'))['cells']


def test_layout():
    for d in ('nbs', 'cxr_pggan', 'data', 'outputs', 'tests'): assert (ROOT / d).is_dir(), d
    for f in ('settings.ini', 'README.md', 'setup.py', '.ci/run'): assert (ROOT / f).is_file(), f
    ini = (ROOT / 'settings.ini').read_text()
    assert 'allowed_cell_metadata_keys = tags' in ini  # else nbdev_clean strips papermill's parameters tag


@pytest.mark.parametrize('nb', NBS, ids=lambda p: p.stem)
def test_notebook_has_kernelspec_and_no_outputs(nb):
    d = json.loads(nb.read_text(encoding='utf-8'))
    ks = d['metadata'].get('kernelspec', {})
    assert ks.get('name') == 'python3' and ks.get('language') == 'python', f'{nb.name}: papermill needs a python3 kernelspec'
    for c in d['cells']:
        if c['cell_type'] == 'code': assert not c.get('outputs') and c.get('execution_count') is None, f'{nb.name}: executed cell committed'


def test_paper_notebooks_have_profile_parameter():
    papers = paper_notebooks(ROOT / 'nbs')
    names = [p.stem for p in papers]
    for must in ('01_data', '06_gan_train'): assert must in names
    for p in papers:
        par = [c for c in cells(p) if 'parameters' in c.get('metadata', {}).get('tags', [])]
        assert len(par) == 1, p.name
        assert "profile = 'smoke'" in ''.join(par[0]['source']), f"{p.name}: the parameters cell must default to profile = 'smoke'"


def test_every_notebook_is_exported_to_the_package():
    for nb in NBS:
        src = '\n'.join(''.join(c['source']) for c in cells(nb) if c['cell_type'] == 'code')
        if '#| default_exp' in src:
            mod = src.split('#| default_exp', 1)[1].split()[0]
            assert (ROOT / 'cxr_pggan' / f'{mod}.py').is_file(), f'{nb.name} -> cxr_pggan/{mod}.py missing: run nbdev_export'


def test_profiles_complete():
    import cxr_pggan.data, cxr_pggan.train  # noqa: F401  (registration happens at import)
    secs = {n: set(PROFILES[n]) for n in PROFILE_NAMES}
    assert secs['smoke'] == secs['demo'] == secs['paper'] and {'dataset', 'gan'} <= secs['smoke']
    for s in secs['smoke']:
        assert set(PROFILES['smoke'][s]) == set(PROFILES['demo'][s]) == set(PROFILES['paper'][s]), s


@pytest.mark.parametrize('verb', sorted(VERBS))
def test_verbs_resolve(verb):
    assert callable(_resolve(VERBS[verb][0]))


@pytest.mark.parametrize('what', sorted(BENCHES))
def test_benches_resolve(what):
    assert callable(_resolve(BENCHES[what]))


def test_cli_help_is_fast_and_lists_verbs():
    r = subprocess.run([sys.executable, '-m', 'cxr_pggan', '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and all(v in r.stdout for v in VERBS)
    r = subprocess.run([sys.executable, '-X', 'importtime', '-c', 'import cxr_pggan.cli'], capture_output=True, text=True)
    assert 'torch' not in {l.split('|')[-1].strip().split('.')[0] for l in r.stderr.splitlines()}, 'cxr_pggan.cli must not import torch'
    r = subprocess.run([sys.executable, '-m', 'cxr_pggan', 'nope'], capture_output=True, text=True)
    assert r.returncode == 2 and 'unknown verb' in r.stderr
