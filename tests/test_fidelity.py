"""The phantom's pixel detectors against the render truth, label-fidelity shares on cases whose answer is known, and
`cxr-pggan fidelity` with bad inputs (one line, exit status 2, nothing that was there changed)."""
import sys
from pathlib import Path

import numpy as np, pandas as pd, pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bad_inputs import cli, one_error, tree                     # the shared helpers (no tests imported)

from cxr_pggan.data import LABELS
from cxr_pggan.fidelity import fidelity_figure, fidelity_rows, fidelity_table, read_usable, verdict
from cxr_pggan.phantom import (DETECTED, DETECTOR_THRESHOLDS, _META_COLS, _metadata, calibrate_detectors, detector_table, measure,
                               render_image, render_phantom, wilson)


def _row(finding):
    "The first real PA row whose only label is `finding`."
    m = _metadata(None)
    return m[(m['Finding Labels'] == finding) & (m['View Position'] == 'PA')].iloc[0][_META_COLS].to_dict()


@pytest.mark.parametrize('finding', ['Pneumothorax', 'Emphysema', 'Effusion'])
def test_detector_sees_the_rendered_finding_and_not_its_absence(finding):
    "The same patient and film rendered with and without the finding: the detector fires on the first only (64² and 128²)."
    r = _row(finding)
    for size in (64, 128):
        with_f = measure(render_image(r, 0, size)[0], findings=True)['findings']
        without = measure(render_image({**r, 'Finding Labels': 'No Finding'}, 0, size)[0], findings=True)['findings']
        assert with_f[finding] is True and without[finding] is False, (finding, size, with_f, without)


def test_detectors_report_unmeasurable_images_as_none():
    m = measure(np.full((64, 64), 128, np.uint8), findings=True)        # a flat image: no lungs
    assert not m['lungs_found'] and set(m['findings']) == set(DETECTED) and all(v is None for v in m['findings'].values())
    assert set(DETECTOR_THRESHOLDS) == {32, 64, 128}


def test_detector_table_counts_against_the_labels():
    "A constructed score frame with known hits: sensitivity 3/4, specificity 5/6, Wilson CIs, usable only at >= 0.8 on both."
    labels = ['Mass'] * 4 + ['No Finding'] * 5 + ['Nodule']
    d = pd.DataFrame({'labels': labels, **{f: [False] * 10 for f in DETECTED}})
    d['Mass'] = pd.Series([None, True, True, True] + [False] * 5 + [True], dtype=object)   # None = not measured = not detected
    t = detector_table({64: d}).set_index('finding')
    assert (t.loc['Mass', 'positives'], t.loc['Mass', 'negatives']) == (4, 6)
    assert t.loc['Mass', 'sensitivity'] == pytest.approx(3 / 4) and t.loc['Mass', 'specificity'] == pytest.approx(5 / 6)
    assert (t.loc['Mass', 'sens_lo'], t.loc['Mass', 'sens_hi']) == pytest.approx(wilson(3, 4))
    assert not t.loc['Mass', 'usable'] and t.loc['Hernia', 'positives'] == 0 and not t.loc['Hernia', 'usable']
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4) and wilson(0, 5)[0] == 0.0
    assert wilson(6, 6) == (pytest.approx(0.6097, abs=1e-4), 1.0) and wilson(0, 7)[1] > 0    # k = n: exactly 1, not 1 - 1e-16


def test_calibration_finds_the_cut_between_separable_scores():
    rng = np.random.default_rng(0)
    lab = ['Hernia'] * 20 + ['No Finding'] * 30
    d = pd.DataFrame({'labels': lab, **{f'score_{f}': rng.normal(0, 1, 50) for f in DETECTED}})
    d['score_Hernia'] = np.r_[rng.uniform(2, 3, 20), rng.uniform(0, 1, 30)]
    thr = calibrate_detectors(d)
    assert 1.0 < thr['Hernia'] < 2.0 and 'Cardiomegaly' not in thr and 'Effusion' not in thr


def _det(values, n):
    return pd.DataFrame({f: list(values) for f in DETECTED} | {'measurable': [True] * n})


def test_fidelity_shares_and_verdicts_on_a_known_case():
    "10 optimised images all show Mass, 9/10 real ones do, no random sample does: created; half showing it is partly created."
    real = fidelity_rows('real', ['Mass'] * 10, _det([True] * 9 + [False], 10))
    rnd = fidelity_rows('random', ['No Finding'] * 20, _det([False] * 20, 20))
    a1 = fidelity_rows('algorithm1', ['Mass'] * 10, _det([True] * 10, 10))
    arc = fidelity_rows('archive', ['Mass'] * 20 + ['No Finding'] * 4, _det([True] * 10 + [False] * 14, 24))
    t = fidelity_table(pd.concat([real, rnd, a1, arc]), {'Mass': True}).set_index(['source', 'finding'])
    assert t.loc[('algorithm1', 'Mass'), 'share'] == 1.0 and t.loc[('algorithm1', 'Mass'), 'verdict'] == 'created'
    assert t.loc[('archive', 'Mass'), 'share'] == pytest.approx(0.5) and t.loc[('archive', 'Mass'), 'verdict'] == 'partly created'
    assert t.loc[('archive', 'Mass'), 'positive_rate'] == pytest.approx(10 / 24)
    assert t.loc[('algorithm1', 'Nodule'), 'verdict'] == 'not measured'       # its detector not marked usable
    assert t.loc[('real', 'Mass'), 'verdict'] == ''                          # verdicts only for generated sources
    # labelled images showing it no more often than random samples: only scored
    assert verdict(0.05, 0.2, 0.3, 0.9, 10, True) == 'only scored'


def test_fidelity_figure_draws_shares_of_one(tmp_path):
    "Every labelled image shows it (k = n): the figure draws (it raised on negative error bars when Wilson's bound rounded below 1)."
    a1 = fidelity_rows('algorithm1', ['Mass'] * 6, _det([True] * 6, 6))
    rnd = fidelity_rows('random', ['No Finding'] * 5, _det([False] * 5, 5))
    t = fidelity_table(pd.concat([a1, rnd]), {'Mass': True})
    out = fidelity_figure(t, tmp_path / 'f.png')
    assert Path(out).is_file() and Image.open(out).size[0] > 0


def test_fidelity_rows_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match='3 label strings but 2'):
        fidelity_rows('x', ['Mass'] * 3, _det([True, False], 2))


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp('fid')
    render_phantom(ws / 'arch', 8, 64, seed=0, workers=1, quiet=True, enrich=1.0)
    pd.DataFrame(dict(size=[32, 64], finding=['Mass', 'Mass'], usable=[False, True])).to_csv(ws / 'det.csv', index=False)
    pd.DataFrame(dict(a=[1])).to_csv(ws / 'notdet.csv', index=False)
    (ws / 'user.csv').write_text('a user file\n')
    (ws / 'garbage.csv').write_bytes(bytes(range(256)) * 4)
    return ws


def test_read_usable_takes_the_nearest_size(ws):
    assert read_usable(ws / 'det.csv', 70) == {'Mass': True} and read_usable(ws / 'det.csv', 30) == {'Mass': False}


def test_fidelity_cli_works_on_an_archive_folder(ws, capsys):
    from cxr_pggan.cli import main                                  # in-process: the subprocess path is covered by the bad inputs
    assert main(['fidelity', str(ws / 'arch'), '--detectors', str(ws / 'det.csv'), '--csv', str(ws / 'out.csv')]) == 0
    assert '8 images' in capsys.readouterr().out and (ws / 'out.csv').is_file()
    t = pd.read_csv(ws / 'out.csv')
    assert list(t.finding) == DETECTED and t.labelled.sum() >= 1 and set(t.source) == {'archive'}


@pytest.mark.parametrize('args,needles', [
    (['{ws}/nowhere'], ['nowhere', 'no such folder']),
    (['{ws}/arch', '--detectors', '{ws}/missing.csv'], ['--detectors', 'missing.csv', 'no such file']),
    (['{ws}/arch', '--detectors', '{ws}/notdet.csv'], ['--detectors', 'notdet.csv', 'not a detector table']),
    (['{ws}/arch', '--csv', '{ws}/user.csv'], ['user.csv']),
    (['{ws}/arch', '--detectors', '{ws}/garbage.csv'], ['--detectors', 'garbage.csv', 'not a readable CSV']),
])
def test_fidelity_cli_bad_inputs(ws, args, needles):
    before = tree(ws)
    r = cli(ws, 'fidelity', *[a.format(ws=ws) for a in args])
    one_error(r, *needles)
    assert tree(ws) == before
