"""The hand-written documentation stays true: every relative link and image of README.md, DEVELOPERS.md and docs/*.md
points to a file that exists (and, with a #fragment into a markdown file, to one of its headings), the README stays an
index (short), every docs page links back to it, and the module map — one block, the same in README.md and
DEVELOPERS.md — lists every module of the package with exactly the package modules it imports, in an order where each
module imports only modules above it."""
import ast, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'cxr_pggan'
PAGES = [ROOT / 'README.md', ROOT / 'DEVELOPERS.md', *sorted((ROOT / 'docs').glob('*.md'))]
README_MAX_WORDS = 2000
MAP_START, MAP_END = '<!-- module-map', '<!-- /module-map -->'


def _prose(text: str) -> str:
    "The markdown without fenced code blocks and inline code, where links are not links."
    text = re.sub(r'(?ms)^\s*```.*?^\s*```[^\n]*$', '', text)
    return re.sub(r'`[^`\n]*`', '', text)


def _links(text: str) -> list[str]:
    "Targets of markdown links and images, and of HTML src/href attributes."
    t = _prose(text)
    return re.findall(r'\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)', t) + re.findall(r'(?:src|href)="([^"]+)"', t)


def _slug(heading: str) -> str:
    "GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."
    h = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)
    h = h.replace('`', '').replace('*', '').strip().lower()
    return ''.join(c for c in h if c.isalnum() or c in ' -_').replace(' ', '-')


def _anchors(path: Path) -> set[str]:
    seen, out = {}, set()
    for line in _prose(path.read_text(encoding='utf-8')).splitlines():
        m = re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
        if not m: continue
        s = _slug(m.group(1)); n = seen.get(s, 0); seen[s] = n + 1
        out.add(s if n == 0 else f'{s}-{n}')
    return out


def test_slug():
    assert _slug('Set up on a fresh machine') == 'set-up-on-a-fresh-machine'
    assert _slug("(a) The main job (the demo)") == 'a-the-main-job-the-demo'
    assert _slug("Memory and time on Kaggle's GPUs") == 'memory-and-time-on-kaggles-gpus'
    assert _slug('Running the `paper` profile') == 'running-the-paper-profile'


def test_links_finds_links_and_images_outside_code():
    md = 'see [a](docs/a.md#x), ![fig](docs/figures/f.png) <img src="b.png">\n`[no](c.md)`\n```\n[no](d.md)\n```\n'
    assert _links(md) == ['docs/a.md#x', 'docs/figures/f.png', 'b.png']


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page.read_text(encoding='utf-8')):
        if re.match(r'[a-z][a-z0-9+.-]*:', target): continue          # http:, https:, mailto:
        path, _, frag = target.partition('#')
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists(): bad.append(f'{target} (no such file)'); continue
        if frag and dest.suffix == '.md' and frag not in _anchors(dest): bad.append(f'{target} (no heading #{frag})')
    assert not bad, f'{page.relative_to(ROOT)}: broken links: ' + '; '.join(bad)


def test_docs_pages_have_a_heading_and_link_back():
    docs = sorted((ROOT / 'docs').glob('*.md'))
    assert docs, 'docs/ has no pages'
    for p in docs:
        text = p.read_text(encoding='utf-8')
        assert text.startswith('# '), f'{p.name}: the first line must be its heading'
        assert '](../README.md)' in text, f'{p.name}: no link back to the README'


def test_readme_is_an_index():
    words = len((ROOT / 'README.md').read_text(encoding='utf-8').split())
    assert words < README_MAX_WORDS, f'README.md has {words} words (limit {README_MAX_WORDS}): move the long part into docs/'


def _map_block(path: Path) -> str:
    text = path.read_text(encoding='utf-8')
    assert text.count(MAP_START) == 1 and text.count(MAP_END) == 1, f'{path.name}: one module-map block expected'
    return text[text.index(MAP_START):text.index(MAP_END)]


def _map_rows(block: str) -> list[tuple[str, str, set[str]]]:
    "(module, notebook link, imported modules) for every row of the map's table."
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        m = re.fullmatch(r'`([\w]+)`', cells[0]) if len(cells) == 4 else None
        if not m: continue
        nb = re.search(r'\]\(([^)]+)\)', cells[1])
        rows.append((m.group(1), nb.group(1) if nb else '', set(re.findall(r'`(\w+)`', cells[2]))))
    return rows


def _package_imports() -> dict[str, set[str]]:
    "Every module of cxr_pggan and the package modules it imports (top level or inside functions), `core` left out."
    mods = {p.stem for p in PKG.glob('*.py')} - {'_modidx', '__init__'}
    out = {}
    for m in mods:
        deps = set()
        for node in ast.walk(ast.parse((PKG / f'{m}.py').read_text(encoding='utf-8'))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module: deps.add(node.module.split('.')[0])
                elif node.level == 1 or node.module == 'cxr_pggan': deps |= {a.name for a in node.names}
                elif node.module and node.module.startswith('cxr_pggan.'): deps.add(node.module.split('.')[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split('.')[1] for a in node.names if a.name.startswith('cxr_pggan.')}
        out[m] = (deps & mods) - {m, 'core'}
    return out


def test_module_map_is_one_text():
    assert _map_block(ROOT / 'README.md') == _map_block(ROOT / 'DEVELOPERS.md'), \
        'the module map differs between README.md and DEVELOPERS.md: change both together'


def test_module_map_matches_the_imports():
    rows = _map_rows(_map_block(ROOT / 'DEVELOPERS.md'))
    actual = _package_imports()
    listed = [m for m, _, _ in rows]
    assert sorted(listed) == sorted(actual), \
        f'module map rows {sorted(set(listed) - set(actual))} have no module; modules {sorted(set(actual) - set(listed))} have no row'
    wrong = {m: f'map says {sorted(deps)}, the code imports {sorted(actual[m])}' for m, _, deps in rows if deps != actual[m]}
    assert not wrong, f'module map vs imports: {wrong}'
    above = set()
    for m, _, deps in rows:
        assert deps <= above, f'module map: {m} imports {sorted(deps - above)}, which sit below it'
        above.add(m)


def test_module_map_names_each_modules_notebook():
    for m, nb, _ in _map_rows(_map_block(ROOT / 'DEVELOPERS.md')):
        text = (ROOT / nb).read_text(encoding='utf-8')
        assert re.search(rf'default_exp {re.escape(m)}\b', text), f'module map: {nb} does not export {m}'
