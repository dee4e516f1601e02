"""pytest setup: outputs go to a temp folder, progress bars are quiet, slow/gpu tests are opt-in/auto-skipped, and every
test starts from seeded global RNGs (random, numpy's legacy global RNG, torch's default generator), whatever ran before it."""
import os, random, tempfile, zlib
import numpy as np
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


@pytest.fixture(autouse=True)
def _seeded_global_rngs(request):
    """Seed the global RNGs before each test from its own id (a test's draws do not depend on which tests ran before it,
    nor on PYTHONHASHSEED) plus `CXR_PGGAN_TEST_SEED` (default 0), which `.ci/seeds` varies to prove that no verdict
    depends on the particular draws. A test that needs particular numbers seeds its own generator."""
    import torch
    seed = (int(os.environ.get('CXR_PGGAN_TEST_SEED', '0')) + zlib.crc32(request.node.nodeid.encode())) % 2 ** 32
    random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
    yield
