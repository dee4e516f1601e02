"Data layer: metadata variants, bad input, image layouts and decoding, the dataset, patient-level splits."
import json, subprocess, sys, time, warnings
from pathlib import Path

import numpy as np, pandas as pd, pytest, torch
from PIL import Image

from cxr_pggan.core import shared_dir
from cxr_pggan.data import (LABELS, FINDINGS, DISPLAY_NAMES, CXRDataset, ImageDecodeError, MetadataError, MissingImagesError,
                            find_images, load_metadata, load_splits, max_prevalence_drift, patient_split, read_image,
                            split_report, write_splits, default_metadata_path)

HEAD_2017 = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
HEAD_2020 = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
HEAD_KAGGLE = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImageWidth,OriginalImageHeight,OriginalImagePixelSpacing_x,OriginalImagePixelSpacing_y\n"
ROWS = [("00000001_000.png", "Cardiomegaly", 0, 1, 58, "M", "PA"),
        ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA"),
        ("00000002_000.png", "No Finding", 0, 2, 81, "F", "AP"),
        ("00000003_000.png", "Effusion|Pleural_Thickening|Hernia", 0, 3, 7, "F", "PA")]


def write_csv(path, head, rows=ROWS, age=lambda a: str(a), trailing=False):
    lines = [head] + [",".join([r[0], r[1], str(r[2]), str(r[3]), age(r[4]), r[5], r[6], "2500", "2048", "0.168", "0.168"])
                      + ("," if trailing else "") + "\n" for r in rows]
    Path(path).write_text("".join(lines))
    return Path(path)


def check_canonical(df):
    assert list(df.columns[:7]) == ['Image Index', 'Finding Labels', 'Follow-up #', 'Patient ID', 'Patient Age', 'Patient Sex', 'View Position']
    assert df['Patient Age'].tolist() == [58, 58, 81, 7]
    assert df['Patient Sex'].tolist() == ['M', 'M', 'F', 'F']
    assert df[LABELS].to_numpy().sum(1).tolist() == [1, 2, 1, 3]
    assert df.loc[3, ['Effusion', 'Pleural_Thickening', 'Hernia']].tolist() == [1, 1, 1]
    assert df.loc[2, 'No Finding'] == 1
    assert not any(str(c).startswith('Unnamed') for c in df.columns)


def test_labels():
    assert LABELS == ['No Finding'] + FINDINGS and len(set(LABELS)) == 15
    assert 'Pleural_Thickening' in LABELS and 'Effusion' in LABELS
    assert DISPLAY_NAMES['Effusion'] == 'Pleural Effusion' and set(DISPLAY_NAMES) == set(LABELS)


@pytest.mark.parametrize('variant', ['2017', '2020', '2020-sex', 'kaggle', 'gz'])
def test_metadata_variants(tmp_path, variant):
    if variant == '2017': p = write_csv(tmp_path / 'a.csv', HEAD_2017, trailing=True)
    elif variant == '2020': p = write_csv(tmp_path / 'a.csv', HEAD_2020)
    elif variant == '2020-sex': p = write_csv(tmp_path / 'a.csv', HEAD_2020.replace('Patient Gender', 'Patient Sex'))
    elif variant == 'kaggle': p = write_csv(tmp_path / 'a.csv', HEAD_KAGGLE, age=lambda a: f'{a:03d}Y')
    else:
        import gzip
        p0 = write_csv(tmp_path / 'a.csv', HEAD_2020)
        p = tmp_path / 'a.csv.gz'; p.write_bytes(gzip.compress(p0.read_bytes()))
    if variant == '2017': assert 'Unnamed: 11' in pd.read_csv(p).columns  # the real file's trailing comma
    check_canonical(load_metadata(p))


def test_default_metadata_is_real_nih():
    df = load_metadata()
    assert default_metadata_path().name == 'Data_Entry_2017_v2020.csv.gz'
    assert len(df) == 112_120 and df['Patient ID'].nunique() == 30_805
    assert set(df['Patient Sex']) == {'M', 'F'} and set(df['View Position']) == {'PA', 'AP'}
    assert df['No Finding'].sum() == 60_361 and df['Hernia'].sum() == 227


def test_missing_column_names_column_and_file(tmp_path):
    p = write_csv(tmp_path / 'bad.csv', HEAD_2020.replace('View Position', 'View'))
    with pytest.raises(MetadataError, match=r"bad\.csv.*missing column\(s\) \['View Position'\]"): load_metadata(p)
    p = write_csv(tmp_path / 'nosex.csv', HEAD_2020.replace('Patient Gender', 'Gender'))
    with pytest.raises(MetadataError, match="nosex.csv.*Patient Sex.*Patient Gender"): load_metadata(p)


def test_unknown_finding_names_row_and_label(tmp_path):
    rows = list(ROWS); rows[2] = ("00000002_000.png", "Cardiomegaly|Pneumonitis", 0, 2, 81, "F", "AP")
    p = write_csv(tmp_path / 'bad.csv', HEAD_2020, rows)
    with pytest.raises(MetadataError, match=r"bad\.csv: row 2 \(CSV line 4, Image Index 00000002_000.png\).*'Pneumonitis'"): load_metadata(p)


def test_bad_values_are_named(tmp_path):
    p = write_csv(tmp_path / 'age.csv', HEAD_KAGGLE, age=lambda a: 'old')
    with pytest.raises(MetadataError, match="age.csv: row 0: 'Patient Age' value 'old'"): load_metadata(p)
    rows = ROWS + [ROWS[0]]
    with pytest.raises(MetadataError, match="appears twice"): load_metadata(write_csv(tmp_path / 'dup.csv', HEAD_2020, rows))
    with pytest.raises(MetadataError, match="does not exist"): load_metadata(tmp_path / 'nope.csv')


def make_images(root, names, kaggle=False):
    for k, n in enumerate(names):
        d = root / (f'images_{k % 2 + 1:03d}' if kaggle else '') / 'images'
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40), 10 * k, np.uint8)).save(d / n)


@pytest.mark.parametrize('kaggle', [False, True])
def test_find_images_layouts(tmp_path, kaggle):
    df = load_metadata(write_csv(tmp_path / 'm.csv', HEAD_2020))
    make_images(tmp_path / 'nih', df['Image Index'], kaggle)
    out = find_images(df, tmp_path / 'nih')
    assert len(out) == 4 and all(Path(p).is_file() for p in out['path'])
    if kaggle: assert {Path(p).parent.parent.name for p in out['path']} == {'images_001', 'images_002'}


def test_missing_images_counted_listed_raise_or_drop(tmp_path):
    rows = ROWS + [(f"0000009{k}_000.png", "No Finding", 0, 90 + k, 30, "M", "PA") for k in range(8)]
    df = load_metadata(write_csv(tmp_path / 'm.csv', HEAD_2020, rows))
    make_images(tmp_path / 'nih', df['Image Index'][:2])
    with pytest.raises(MissingImagesError) as e: find_images(df, tmp_path / 'nih')
    msg = str(e.value)
    assert '10 of 12 images' in msg and 'first 10' in msg and '00000097_000.png' in msg and "on_missing='drop'" in msg
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        assert len(find_images(df, tmp_path / 'nih', on_missing='drop')) == 2
    assert '10 of 12' in str(w[0].message)


def test_decode_variants(tmp_path):
    g = np.linspace(0, 255, 48 * 48).reshape(48, 48).astype(np.uint8)
    Image.fromarray(g).save(tmp_path / 'l.png')
    Image.fromarray(np.stack([g] * 3, -1)).save(tmp_path / 'rgb.png')
    Image.fromarray(np.stack([g] * 3 + [np.full_like(g, 128)], -1), 'RGBA').save(tmp_path / 'rgba.png')
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / 'g16.png')
    for f in ('l', 'rgb', 'rgba', 'g16'):
        a = read_image(tmp_path / f'{f}.png')
        assert a.dtype == np.float32 and a.shape == (48, 48)
        np.testing.assert_allclose(a, g / 255, atol=1.5 / 255, err_msg=f)


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_corrupt_png_names_path(tmp_path, damage):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / 'ok.png')
    b = (tmp_path / 'ok.png').read_bytes()
    bad = tmp_path / f'{damage}.png'
    bad.write_bytes({'truncated': b[:len(b) // 2], 'garbage': b'not a png at all', 'empty': b''}[damage])
    with pytest.raises(ImageDecodeError, match=f'{damage}.png'): read_image(bad)


def test_dataset_shapes_range_and_augment(tmp_path):
    make_images(tmp_path / 'd', [r[0] for r in ROWS])
    df = find_images(load_metadata(write_csv(tmp_path / 'm.csv', HEAD_2020)), tmp_path / 'd')
    for ch in (1, 3):
        x, y = CXRDataset(df, size=16, channels=ch)[3]
        assert x.shape == (ch, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
        assert y.shape == (15,) and y[LABELS.index('Hernia')] == 1
    torch.manual_seed(0)
    ds = CXRDataset(df, size=16, augment=True)
    assert ds.tf is not None and ds[0][0].shape == (1, 16, 16)
    with pytest.raises(KeyError, match='find_images'): CXRDataset(df.drop(columns='path'))


# ---------------------------------------------------------------- splits on the full real metadata
@pytest.fixture(scope='module')
def nih(): return load_metadata()


@pytest.fixture(scope='module')
def nih_split(nih):
    t0 = time.time(); s = patient_split(nih, seed=0)
    return s, time.time() - t0


def test_split_no_leak_and_prevalence(nih, nih_split):
    s, secs = nih_split
    assert set(s) == {'train', 'val', 'test'}
    assert nih.assign(split=s).groupby('Patient ID')['split'].nunique().max() == 1
    rep = split_report(nih, s)
    assert max_prevalence_drift(rep) <= 0.5, rep
    np.testing.assert_allclose(rep.loc[['train', 'val', 'test'], 'share'], [70, 10, 20], atol=0.5)
    assert secs < 60


def test_split_deterministic_and_seeded(nih, nih_split):
    s, _ = nih_split
    assert (patient_split(nih, seed=0) == s).all()
    assert (patient_split(nih, seed=1) != s).any()


def test_halves_and_files(nih, tmp_path):
    p = write_splits(nih, tmp_path, halves=True, seed=3)
    sp = pd.read_csv(p)
    assert list(sp.columns) == ['Image Index', 'Patient ID', 'split'] and set(sp['split']) == {'half_1', 'half_2'}
    rep = pd.read_csv(tmp_path / 'split_report.csv', index_col=0)
    assert max_prevalence_drift(rep) <= 0.5
    prov = json.loads((tmp_path / 'splits.csv.provenance.json').read_text())
    assert prov['inputs']['metadata']['sha256'] and prov['artifact']['sha256'] and prov['max_prevalence_drift_pp'] <= 0.5
    joined = load_splits(p, nih)
    assert len(joined) == len(nih) and joined['split'].notna().all()


def test_load_splits_rejects_leaks_and_gaps(tmp_path, nih):
    sub = nih.iloc[:50]
    p = write_splits(sub, tmp_path, fractions=(0.5, 0.5))
    s = pd.read_csv(p); pid = s['Patient ID'].value_counts().index[0]
    rows = s[s['Patient ID'] == pid].index
    if len(rows) > 1:
        s.loc[rows[0], 'split'] = 'train'; s.loc[rows[1], 'split'] = 'test'
        s.to_csv(tmp_path / 'leak.csv', index=False)
        with pytest.raises(MetadataError, match='more than one split'): load_splits(tmp_path / 'leak.csv')
    with pytest.raises(MetadataError, match='have no split'): load_splits(p, nih.iloc[:60])


def test_bad_fractions(nih):
    with pytest.raises(ValueError, match='summing to 1'): patient_split(nih.iloc[:100], fractions=(0.7, 0.2))


def test_split_cli(tmp_path):
    md = write_csv(tmp_path / 'm.csv', HEAD_2017, trailing=True)
    r = subprocess.run([sys.executable, '-m', 'cxr_pggan', 'split', '--metadata', str(md), '--out', str(tmp_path / 'o'),
                        '--fractions', '0.5', '0.5', '--seed', '1'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'largest prevalence drift' in r.stdout
    sp = pd.read_csv(tmp_path / 'o' / 'splits.csv')
    assert len(sp) == 4 and set(sp['split']) <= {'train', 'test'}


# ---------------------------------------------------------------- the 16 real NIH samples in ../shared
@pytest.fixture
def nih_samples():
    d = shared_dir('data', 'nih_samples')
    if d is None: pytest.skip('../shared/data/nih_samples is absent')
    return d


def test_real_nih_samples(nih_samples):
    df = load_metadata(nih_samples / 'Data_Entry_2017_v2020_subset.csv')
    assert len(df) == 16
    full = load_metadata().set_index('Image Index')
    assert (full.loc[df['Image Index'], LABELS].to_numpy() == df[LABELS].to_numpy()).all()
    ds = CXRDataset(find_images(df, nih_samples), size=64)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    assert xs.shape == (16, 1, 64, 64) and 0.05 < xs.mean() < 0.95 and xs.std() > 0.05
