"pytest setup: outputs go to a temp folder, progress bars are quiet, slow/gpu tests are opt-in/auto-skipped."
import os, tempfile
import pytest

os.environ.setdefault('TQDM_DISABLE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('CXR_PGGAN_OUTPUTS', tempfile.mkdtemp(prefix='cxr_pggan_pytest_outputs_'))


def pytest_addoption(parser):
    parser.addoption('--slow', action='store_true', default=False, help='also run tests marked slow')


def pytest_collection_modifyitems(config, items):
    import torch
    run_slow = config.getoption('--slow') or os.environ.get('CXR_PGGAN_SLOW') == '1' or 'slow' in (config.getoption('-m') or '')
    skip_slow = pytest.mark.skip(reason='slow: run with --slow')
    skip_gpu = pytest.mark.skip(reason='gpu: no CUDA device here')
    for it in items:
        if 'slow' in it.keywords and not run_slow: it.add_marker(skip_slow)
        if 'gpu' in it.keywords and not torch.cuda.is_available(): it.add_marker(skip_gpu)
