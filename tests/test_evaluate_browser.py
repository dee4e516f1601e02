"""The evaluation report in a real browser (headless Chromium through Debian's chromedriver), opened from disk: every
section and figure renders (each image decoded), nothing is requested from anywhere but the file itself, it prints, and a
screenshot is saved. Skips when Chromium is absent, unless CXR_PGGAN_REQUIRE_BROWSER=1 (CI), where a missing browser fails."""
import base64, os
from pathlib import Path

import numpy as np, pandas as pd, pytest
from PIL import Image

from test_study_browser import chromium

SECTIONS = ('summary', 'fidelity', 'labels', 'utility', 'privacy', 'readers', 'provenance')


@pytest.fixture(scope='module')
def browser():
    drv = chromium('report', '1200,1600', '--allow-file-access-from-files')
    yield drv
    drv.quit()


def _folder(root, n, size, seed, prefix, labelled=True, patients=None):
    "An NIH-layout folder (or, unlabelled, plain PNGs) of seeded smooth-noise images."
    rng = np.random.default_rng(seed); root = Path(root); img = root / 'images' if labelled else root; img.mkdir(parents=True)
    labs = ['No Finding', 'Cardiomegaly', 'Effusion|Mass', 'No Finding', 'Atelectasis', 'Nodule']
    rows = []
    for i in range(n):
        low = rng.random((8, 8)); a = np.kron(low, np.ones((size // 8, size // 8))) * 200 + rng.random((size, size)) * 55
        name = f'{prefix}{i // 2:08d}_{i % 2:03d}.png'; Image.fromarray(a.astype(np.uint8)).save(img / name)
        rows.append({'Image Index': name, 'Finding Labels': labs[i % len(labs)], 'Follow-up #': i % 2, 'Patient ID': (patients or 1) + i // 2,
                     'Patient Age': 50, 'Patient Gender': 'MF'[i % 2], 'View Position': 'PA'})
    if labelled: pd.DataFrame(rows).to_csv(root / 'Data_Entry_2017.csv', index=False)
    return root


@pytest.fixture(scope='module')
def report(tmp_path_factory):
    "A report with every part: a 36-image real folder, a labelled and an unlabelled synthetic set, a random classifier."
    from cxr_pggan.evaluate import evaluate
    from cxr_pggan.latent import random_networks
    tmp = tmp_path_factory.mktemp('report')
    real = _folder(tmp / 'real', 36, 32, 0, '')
    lab = _folder(tmp / 'gen_a', 12, 32, 1, 'a', patients=5000)
    raw = _folder(tmp / 'gen_b', 10, 32, 2, 'b', labelled=False)
    _, clf = random_networks(tmp / 'nets', 32)
    evaluate(real, [lab, raw], tmp / 'out', classifier=clf, profile='smoke', allow_random_weights=True, fid_boot=2, ci_boot=20,
             kid_subsets=2, prdc_k=2, utility_max_steps=1, pixel_size=16, grids=1, grid_size=2, pairs=1, display=32)
    return tmp / 'out' / 'report.html'


def test_report_renders_offline_in_chromium(browser, report, tmp_path):
    drv = browser
    drv.get(report.as_uri())
    assert drv.title == 'Evaluation of synthetic chest x-rays'
    for sec in SECTIONS:                                                    # every part is there and takes space on the page
        h = drv.execute_script(f"const s = document.getElementById('{sec}'); return s ? s.getBoundingClientRect().height : -1")
        assert h > 20, (sec, h)
    imgs = drv.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.src.slice(0, 22), i.alt])")
    assert len(imgs) >= 5, imgs                                             # fidelity (2), labels, utility, privacy (2 per set)
    for done, w, src, alt in imgs: assert done and w > 0 and src == 'data:image/png;base64,', (alt, done, w, src)
    secs_with_figures = drv.execute_script("return Array.from(document.querySelectorAll('section')).filter(s => s.querySelector('img')).map(s => s.id)")
    assert {'fidelity', 'labels', 'utility', 'privacy'} <= set(secs_with_figures), secs_with_figures
    # nothing but the file itself: no resource was fetched, every URL in the page is a data: URI, and the CSP forbids the rest
    assert drv.execute_script("return performance.getEntriesByType('resource').map(e => e.name)") == []
    urls = drv.execute_script("return Array.from(document.querySelectorAll('[src],[href]')).map(e => e.getAttribute('src') || e.getAttribute('href'))")
    assert all(u.startswith('data:') for u in urls), [u[:40] for u in urls if not u.startswith('data:')]
    csp = drv.execute_script("return document.querySelector('meta[http-equiv=\"Content-Security-Policy\"]').content")
    assert "default-src 'none'" in csp and 'img-src data:' in csp
    # the summary marks the best set of a row that has a direction
    assert drv.execute_script("return document.querySelectorAll('table.summary td.best').length") >= 1
    pdf = base64.b64decode(drv.execute_cdp_cmd('Page.printToPDF', {'printBackground': True})['data'])     # printable
    assert pdf[:5] == b'%PDF-' and len(pdf) > 10_000
    shot = Path(os.environ.get('CXR_PGGAN_OUTPUTS', tmp_path)) / 'screenshots' / 'evaluate_report.png'
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert drv.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0
    print(f'\nscreenshot of the report: {shot}')
