"""The reader page in a real browser (headless Chromium driven by selenium through Debian's chromedriver): open a reader
link, see its style applied, answer a grid and a pair by clicking, reload and resume at the same place, and find the
answers in the database.
Skips when Chromium is absent, unless CXR_PGGAN_REQUIRE_BROWSER=1 (CI), where a missing browser fails."""
import os, shutil, time
from pathlib import Path

import pytest

from cxr_pggan import study as S

CHROMIUM = os.environ.get('CXR_PGGAN_CHROMIUM') or shutil.which('chromium') or shutil.which('chromium-browser') or '/usr/bin/chromium'
DRIVER = os.environ.get('CXR_PGGAN_CHROMEDRIVER') or shutil.which('chromedriver') or '/usr/bin/chromedriver'
REQUIRED = os.environ.get('CXR_PGGAN_REQUIRE_BROWSER') == '1'


def chromium(what: str, window: str, *extra: str):
    "Headless Chromium through Debian's chromedriver, or a skip (a failure under CXR_PGGAN_REQUIRE_BROWSER=1) naming what is missing."
    missing = [p for p in (CHROMIUM, DRIVER) if not Path(p).is_file()]
    try: import selenium  # noqa: F401
    except ImportError: missing.append('the selenium package (pip install selenium)')
    if missing:
        msg = f"no browser for the {what} test: missing {', '.join(map(str, missing))} (apt-get install chromium chromium-driver)"
        if REQUIRED: pytest.fail(msg + ' — CXR_PGGAN_REQUIRE_BROWSER=1 is set, so this fails instead of skipping')
        pytest.skip(msg)
    os.environ.setdefault('SE_AVOID_STATS', 'true')
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions(); opts.binary_location = CHROMIUM
    for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', f'--window-size={window}', '--no-first-run', *extra):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)            # an explicit driver: selenium-manager downloads nothing
    drv.set_page_load_timeout(30)
    return drv


@pytest.fixture(scope='module')
def browser():
    drv = chromium('reader-page', '1100,900')
    yield drv
    drv.quit()


def wait_for(drv, cond, timeout=15):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = drv.execute_script(cond)
        if v: return v
        time.sleep(0.05)
    state = drv.execute_script('return document.body.dataset.state')
    msg = drv.execute_script("return document.getElementById('message').textContent")
    raise AssertionError(f'timed out waiting for {cond}; page state: {state}, message: {msg}')


def test_reader_page_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from cxr_pggan.core import section_params
    from cxr_pggan.experiment import resolve_dataset
    from cxr_pggan.latent import random_networks
    from cxr_pggan.pggan import sample_images
    reals = list(resolve_dataset(section_params('smoke', 'dataset')).frame['path'][:20])      # smoke phantom x-rays
    gan, _ = random_networks(tmp_path / 'nets', 32)                                          # an untrained PGGAN's images
    fakes = [x.numpy() for b in sample_images(gan, 20, device='cpu') for x in b]
    m = S.create_study(tmp_path / 'study', reals, fakes, grids=2, grid_size=6, pairs=3, display=160, seed=0)
    r = S.add_reader(m['study'], 'Dr Browser', 'consultant')
    drv = browser
    with S.StudyServer(m['study']) as srv:
        link = r['link'].replace('http://127.0.0.1:8765', srv.url)
        drv.get(link)
        wait_for(drv, "return document.body.dataset.state === 'grid' && document.querySelectorAll('.cell img').length === 6 && "
                      "Array.from(document.querySelectorAll('.cell img')).every(i => i.complete && i.naturalWidth === 160)")
        assert 'Item 1 of 5' in drv.find_element(By.ID, 'progress').text
        # the style sheet (a file: the CSP allows no inline style) is applied: a dark page, three columns in a grid
        assert drv.execute_script('return getComputedStyle(document.body).backgroundColor') == 'rgb(17, 17, 17)'
        assert len(drv.execute_script("return getComputedStyle(document.getElementById('images')).gridTemplateColumns").split()) == 3
        first = drv.execute_script('return document.body.dataset.item')
        cells = drv.find_elements(By.CSS_SELECTOR, '.cell')
        cells[0].click(); cells[3].click(); cells[3].click(); cells[4].click()          # 3 toggled off again: 0 and 4 called real
        assert [c.get_attribute('aria-pressed') for c in cells] == ['true', 'false', 'false', 'false', 'true', 'false']
        assert drv.execute_script('return getComputedStyle(arguments[0]).borderTopColor', cells[0]) == 'rgb(46, 204, 113)'   # selected: green
        shot = Path(os.environ.get('CXR_PGGAN_OUTPUTS', tmp_path)) / 'screenshots' / 'reader_study_page.png'
        shot.parent.mkdir(parents=True, exist_ok=True); drv.save_screenshot(str(shot))
        print(f'\nscreenshot of the reader page: {shot}')
        drv.find_element(By.ID, 'submit').click()
        wait_for(drv, f"return document.body.dataset.item && document.body.dataset.item !== '{first}'")
        # the second grid by keyboard: keys 2 and 6, Enter
        second = drv.execute_script('return document.body.dataset.item')
        body = drv.find_element(By.TAG_NAME, 'body'); body.send_keys('2'); body.send_keys('6'); body.send_keys(Keys.ENTER)
        wait_for(drv, "return document.body.dataset.state === 'pair'")
        # a pair: the Next button waits for a choice; click the right image, then Next
        assert drv.find_element(By.ID, 'submit').get_attribute('disabled') is not None
        pair = drv.execute_script('return document.body.dataset.item')
        drv.find_elements(By.CSS_SELECTOR, '.cell')[1].click(); drv.find_element(By.ID, 'submit').click()
        wait_for(drv, f"return document.body.dataset.item !== '{pair}' && document.body.dataset.state === 'pair'")
        here = drv.execute_script('return document.body.dataset.item')
        # reload: the same reader resumes at the same item, with the same progress
        drv.refresh()
        wait_for(drv, "return document.body.dataset.state === 'pair'")
        assert drv.execute_script('return document.body.dataset.item') == here
        assert 'Item 4 of 5' in drv.find_element(By.ID, 'progress').text
        # the answers are in the database, as clicked
        a = S.load_answers(m['study'])
        called = {it: sorted(g.loc[g.called_real == 1, 'slot']) for it, g in a.groupby('item')}
        assert called == {first: [0, 4], second: [1, 5], pair: [1]}
        assert a.drop_duplicates('item')['seconds'].notna().all() and (a['client_seconds'] > 0).all()
        # finish: the page says so
        for _ in range(2):
            cur = drv.execute_script('return document.body.dataset.item')
            body = drv.find_element(By.TAG_NAME, 'body'); body.send_keys(Keys.ARROW_LEFT); body.send_keys(Keys.ENTER)
            wait_for(drv, f"return document.body.dataset.item !== '{cur}' || document.body.dataset.state === 'done'")
        wait_for(drv, "return document.body.dataset.state === 'done'")
        assert 'every item is answered' in drv.find_element(By.ID, 'instructions').text
        assert len(S.load_answers(m['study']).drop_duplicates('item')) == 5
