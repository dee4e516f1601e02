"""Helpers of the CI scripts (stdlib only, so any Python 3 runs them):
  python .ci/verdicts.py check-lock constraints.txt       every installed package is in the lock, at the lock's version
  python .ci/verdicts.py lockdiff OLD NEW                 how two pip freezes / locks differ, one line
  python .ci/verdicts.py newest DIR                       the newest-versions report of a `.ci/newest` run in DIR
  python .ci/verdicts.py seeds DIR                        compare the verdicts of the `.ci/seeds` runs in DIR (exit 1: differ)
What these print never looks like a test runner's closing line: CI reads the main pytest run's verdict."""
import re, subprocess, sys
import xml.etree.ElementTree as ET
from pathlib import Path


def norm(name: str) -> str: return re.sub(r'[-_.]+', '-', name).lower()


def pins(text: str) -> dict:
    "{normalised name: (name, version)} of the `name==version` lines of a lock or a pip freeze."
    out = {}
    for line in text.splitlines():
        line = line.split('#')[0].strip()
        if '==' in line:
            name, ver = (s.strip() for s in line.split('==', 1))
            out[norm(name)] = (name, ver.split(';')[0].strip())
    return out


def lockdiff(old: dict, new: dict) -> list[str]:
    "'scikit-learn 1.9.1 -> 1.10.0', 'foo 1.0 (new)', 'bar 2.0 (gone)': how `new` differs from `old`."
    out = [f'{new[k][0]} {old[k][1]} -> {new[k][1]}' for k in sorted(old.keys() & new.keys()) if old[k][1] != new[k][1]]
    out += [f'{new[k][0]} {new[k][1]} (not in the lock)' for k in sorted(new.keys() - old.keys())]
    out += [f'{old[k][0]} {old[k][1]} (no longer installed)' for k in sorted(old.keys() - new.keys())]
    return out


def freeze(python: str = sys.executable) -> dict:
    txt = subprocess.run([python, '-m', 'pip', 'freeze', '--all', '--exclude-editable'], capture_output=True, text=True, check=True).stdout
    return {k: v for k, v in pins(txt).items() if k not in ('pip', 'cxr-pggan')}


def check_lock(lock_file: str) -> int:
    "Exit 1 unless the running environment holds exactly the lock's versions and nothing the lock lacks."
    lock, have = pins(Path(lock_file).read_text()), freeze()
    wrong = [f'{have[k][0]} {have[k][1]} (lock: {lock[k][1]})' for k in sorted(have.keys() & lock.keys()) if have[k][1] != lock[k][1]]
    extra = [f'{have[k][0]} {have[k][1]}' for k in sorted(have.keys() - lock.keys())]
    if wrong or extra:
        print(f"FAIL: the install does not match {lock_file}: "
              + '; '.join(filter(None, [wrong and 'other versions: ' + ', '.join(wrong),
                                        extra and 'not in the lock: ' + ', '.join(extra)]))
              + "; a new or changed dependency in settings.ini needs a new lock: run `bash .ci/lock`, then the suite", file=sys.stderr)
        return 1
    print(f'lock: the {len(have)} installed packages are exactly those of {lock_file}')
    return 0


def junit(path: Path) -> dict:
    "{test id: 'passed' | 'failed' | 'error' | 'skipped'} of a pytest --junitxml file."
    out = {}
    for tc in ET.parse(path).iter('testcase'):
        cls, name = tc.get('classname', ''), tc.get('name', '')
        parts = cls.split('.')
        i = next((j for j in range(len(parts), 0, -1) if Path(*parts[:j]).with_suffix('.py').is_file()), len(parts))
        tid = '/'.join(parts[:i]) + '.py' + ''.join(f'::{p}' for p in parts[i:]) + f'::{name}'
        kinds = {c.tag for c in tc}
        out[tid] = 'failed' if 'failure' in kinds else 'error' if 'error' in kinds else 'skipped' if 'skipped' in kinds else 'passed'
    return out


def nbdev(log: Path) -> dict:
    "{'nb NN_name.ipynb': 'passed' | 'failed'} from the output of `nbdev_test --do_print`."
    text = log.read_text(errors='replace')
    ran = [Path(m).name for m in re.findall(r'^Starting (.+\.ipynb)$', text, re.M)]
    failed = set()
    m = re.search(r'nbdev Tests Failed On The Following Notebooks:\n=+\n((?:\t.*\n?)+)', text)
    if m: failed = {l.strip() for l in m.group(1).splitlines() if l.strip()}
    return {f'nb {n}': 'failed' if n in failed else 'passed' for n in ran} | {f'nb {n}': 'failed' for n in failed}


def run_verdicts(d: Path) -> tuple[dict, list[str]]:
    "The verdicts of one suite run in folder `d` (nbdev.log, junit.xml, *.rc) and what went wrong outside them."
    v, problems = {}, []
    if (d / 'nbdev.log').is_file(): v |= nbdev(d / 'nbdev.log')
    if (d / 'junit.xml').is_file(): v |= junit(d / 'junit.xml')
    elif (d / 'pytest.rc').is_file(): problems.append(f'pytest wrote no junit file (exit {(d / "pytest.rc").read_text().strip()})')
    for what in ('nbdev', 'pytest'):
        rc = (d / f'{what}.rc').read_text().strip() if (d / f'{what}.rc').is_file() else None
        if rc not in (None, '0') and not any(x in ('failed', 'error') for x in v.values()):
            problems.append(f'{what} exited {rc} without a failing notebook or test (see {d / (what + ".log")})')
    return v, problems


def newest(d: Path) -> int:
    "Print the newest-versions report (the short form .ci/run shows; the whole one is DIR/report.txt)."
    d = Path(d)
    lock, new = pins(Path('constraints.txt').read_text()), pins((d / 'freeze.txt').read_text()) if (d / 'freeze.txt').is_file() else {}
    new.pop('cxr-pggan', None); new.pop('pip', None)
    diff = lockdiff(lock, new) if new else ['(the install failed: see ' + str(d / 'install.log') + ')']
    v, problems = run_verdicts(d)
    broke = sorted(k for k, x in v.items() if x in ('failed', 'error'))
    ok = sum(x == 'passed' for x in v.values())
    lines = [f'newest-versions check (no lock): {len(diff) if new else "?"} package(s) differ from constraints.txt: '
             + (', '.join(diff) if diff else 'none'),
             f'newest-versions check: broke: {", ".join(broke)}' if broke else
             f'newest-versions check: nothing broke ({ok} notebooks and tests ok)' if v else 'newest-versions check: no verdicts',
             *(f'newest-versions check: {p}' for p in problems),
             f'newest-versions check: logs and report in {d}']
    (d / 'report.txt').write_text('\n'.join(lines + ['', 'differences:'] + diff + ['', 'broke:'] + broke) + '\n')
    print('\n'.join(lines))
    return 0


def seeds(d: Path) -> int:
    "Compare the verdicts of runs DIR/run1, run2, ...: exit 1 when one failed or a verdict differs between runs."
    runs = sorted((p for p in Path(d).glob('run*') if p.is_dir()), key=lambda p: int(p.name[3:]))
    if not runs: print(f'seeds: no runs in {d}'); return 1
    got = {r.name: run_verdicts(r) for r in runs}
    ids = sorted(set().union(*(v for v, _ in got.values())))
    bad = []
    for r, (v, problems) in got.items():
        seed = (Path(d) / r / 'seed').read_text().strip() if (Path(d) / r / 'seed').is_file() else '?'
        broke = sorted(k for k, x in v.items() if x in ('failed', 'error'))
        print(f'seeds: {r} ({seed}): {len(v)} verdicts, broke: {", ".join(broke) or "none"}')
        bad += [f'{r}: {k} {v[k]}' for k in broke] + [f'{r}: {p}' for p in problems]
    differ = [(i, {r: got[r][0].get(i, 'absent') for r in got}) for i in ids if len({got[r][0].get(i, 'absent') for r in got}) > 1]
    for i, per in differ: print(f'seeds: DIFFERS {i}: ' + ', '.join(f'{r} {x}' for r, x in per.items()))
    for b in bad: print(f'seeds: FAIL {b}')
    verdict = 'the same verdicts in every run' if not differ else f'{len(differ)} verdict(s) differ between runs'
    print(f'seeds: {len(runs)} runs, {len(ids)} notebooks and tests: {verdict}'
          + (f'; {len(bad)} failure(s)' if bad else '; no failure'))
    return 1 if differ or bad else 0


if __name__ == '__main__':
    cmd, *args = sys.argv[1:] or ['-h']
    if cmd == 'check-lock': sys.exit(check_lock(*args))
    if cmd == 'lockdiff':
        old, new = ({k: v for k, v in pins(Path(a).read_text()).items() if k not in ('pip', 'cxr-pggan')} for a in args)
        diff = lockdiff(old, new)
        print('\n'.join(diff) if diff else 'no version differs'); sys.exit(0)
    if cmd == 'newest': sys.exit(newest(Path(*args)))
    if cmd == 'seeds': sys.exit(seeds(Path(*args)))
    sys.exit(__doc__)
