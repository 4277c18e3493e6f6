"End-to-end tests of the data commands: `codseg make-synthetic` and `codseg data-check`."
import hashlib, os, re, shutil, subprocess, sys
from pathlib import Path
import numpy as np, cv2, pytest
from codseg.cli import main
from conftest import tree_hash

CAMO = Path(__file__).resolve().parent/'fixtures'/'CAMO-sample'  # three real CAMO pairs (Test split only)


def run(*args, env=None):
    "Run `python -m codseg ARGS` in a fresh process."
    return subprocess.run([sys.executable, '-m', 'codseg', *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def cli(capsys, *args):
    "Run `codseg ARGS` in this process; (status, stdout, stderr)."
    rc = main([str(a) for a in args]); out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    "A small synthetic dataset written by the real CLI."
    d = tmp_path_factory.mktemp('syn')/'data'
    r = run('make-synthetic', d, '--n', 16, '--size', 64, '--seed', 3)
    assert r.returncode == 0, r.stderr
    assert 'wrote' in r.stdout and str(d) in r.stdout
    return d


def test_make_synthetic_is_deterministic(synthetic, tmp_path, capsys):
    rc, out, _ = cli(capsys, 'make-synthetic', tmp_path/'again', '--n', 16, '--size', 64, '--seed', 3)
    assert rc == 0 and tree_hash(tmp_path/'again') == tree_hash(synthetic)
    assert cli(capsys, 'make-synthetic', tmp_path/'other', '--n', 16, '--size', 64, '--seed', 4)[0] == 0
    assert tree_hash(tmp_path/'other') != tree_hash(synthetic)
    names = sorted(p.name for p in (synthetic/'Train'/'Image').iterdir())
    assert names[0] == 'COD10K-CAM-1-Aquatic-1-Synthetic-00001.png' and any('-NonCAM-' in n for n in names)
    img = cv2.imread(str(synthetic/'Train'/'Image'/names[0])); mask = cv2.imread(str(synthetic/'Train'/'GT_Object'/names[0]), 0)
    assert img.shape == (64, 64, 3) and mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}


def test_make_synthetic_never_overwrites_user_files(tmp_path, capsys):
    (tmp_path/'mine').mkdir(); (tmp_path/'mine'/'notes.txt').write_text('keep me')
    rc, _, err = cli(capsys, 'make-synthetic', tmp_path/'mine', '--n', 4, '--size', 32)
    assert rc == 2 and 'not empty' in err and (tmp_path/'mine'/'notes.txt').read_text() == 'keep me'
    assert sorted(p.name for p in (tmp_path/'mine').iterdir()) == ['notes.txt']
    assert cli(capsys, 'make-synthetic', tmp_path/'syn', '--n', 4, '--size', 32)[0] == 0
    assert cli(capsys, 'make-synthetic', tmp_path/'syn', '--n', 6, '--size', 32)[0] == 0  # its own dataset: replaced
    assert len(list((tmp_path/'syn'/'Train'/'Image').iterdir())) == 7


def test_data_check_synthetic(synthetic):
    before = tree_hash(synthetic)
    r = run('data-check', '--dataset-path', synthetic)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert 'layout:  COD10K-v3' in out and str(synthetic) in out
    assert 'train' in out and '16 pairs' in out and 'NonCAM 1' in out and 'left out' in out
    assert 'test COD10K' in out and '4 pairs' in out
    assert 'training 14, validation 2 (seeded 10% of train, seed 42)' in out and 'no problems found' in out
    assert tree_hash(synthetic) == before


def test_data_check_include_noncam_and_val_path(synthetic, capsys):
    rc, out, _ = cli(capsys, 'data-check', '--dataset-path', synthetic, '--include-noncam', '--val-fraction', '0.25')
    assert rc == 0 and '17 pairs' in out and 'NonCAM 1 kept' in out and 'training 13, validation 4 (seeded 25%' in out
    rc, out, err = cli(capsys, 'data-check', '--dataset-path', synthetic, '--val-path', 'COD10K')
    assert rc == 2 and 'COD10K is a test set' in err and '--allow-test-training' in err  # never validated on by default
    rc, out, _ = cli(capsys, 'data-check', '--dataset-path', synthetic, '--val-path', 'COD10K', '--allow-test-training')
    assert rc == 0 and 'training 16, validation 4 (--val-path COD10K)' in out and 'WARNING: trains or validates' in out


def test_data_check_camo_fixture(synthetic, capsys):
    before = tree_hash(CAMO)
    rc, out, _ = cli(capsys, 'data-check', '--dataset-path', CAMO, '--decode')
    assert 'layout:  CAMO' in out and 'test CAMO' in out and '3 pairs' in out
    assert 'checked every pixel of training 0, validation 0, CAMO 3 pairs: 0 bad' in out
    assert rc == 1 and 'no training images' in out  # a test split only: training could not start
    rc, out, err = cli(capsys, 'data-check', '--dataset-path', synthetic, '--val-path', CAMO)  # CAMO's Test split
    assert rc == 1 and 'training would stop' in out and 'test set of the field' in out
    rc, out, _ = cli(capsys, 'data-check', '--dataset-path', synthetic, '--val-path', CAMO, '--allow-test-training')
    assert rc == 0 and f'training 16, validation 3 (--val-path {CAMO})' in out
    assert 'checked the headers of training 16, validation 3, COD10K 4 pairs: 0 bad' in out
    assert tree_hash(CAMO) == before


def test_data_check_reports_bad_pairs(synthetic, tmp_path, capsys):
    d = tmp_path/'broken'; shutil.copytree(synthetic, d)
    stem = 'COD10K-CAM-1-Aquatic-1-Synthetic-00005'
    cv2.imwrite(str(d/'Train'/'GT_Object'/f'{stem}.png'), np.zeros((10, 12), np.uint8))
    (d/'Train'/'GT_Object'/'COD10K-CAM-1-Aquatic-1-Synthetic-00006.png').unlink()
    (d/'Train'/'Image'/'README.txt').write_text('stray')
    before = tree_hash(d)
    rc, out, _ = cli(capsys, 'data-check', '--dataset-path', d)
    assert rc == 1 and 'training would stop' in out
    assert f'{stem}.png is 64x64 (WxH) but its mask' in out and '12x10' in out
    assert 'COD10K-CAM-1-Aquatic-1-Synthetic-00006.png' in out and '--skip-bad' in out
    assert 'ignored 1 non-image file(s) in Train/Image: README.txt' in out
    rc, out, _ = cli(capsys, 'data-check', '--dataset-path', d, '--skip-bad')
    n_tr, n_va = map(int, re.search(r'^training (\d+), validation (\d+)', out, re.M).groups())
    assert rc == 0 and n_tr + n_va == 14 and n_va >= 1 and 'leaves the bad pairs out' in out
    assert tree_hash(d) == before


def test_data_check_wrong_path_and_kaggle_search(synthetic, tmp_path, capsys):
    kin = tmp_path/'kaggle'/'input'; kin.mkdir(parents=True)
    rc, _, err = cli(capsys, 'data-check', '--dataset-path', tmp_path/'nope'/'COD10K-v3')
    assert rc == 2 and "nope/COD10K-v3' does not exist" in err and 'Fix:' in err
    shutil.copytree(synthetic, kin/'cod10k-dataset'/'versions'/'2'/'COD10K-v3')
    env = {'CODSEG_KAGGLE_INPUT': str(kin)}
    r = run('data-check', env=env)  # no --dataset-path: search the Kaggle input folder
    assert r.returncode == 0 and str(kin/'cod10k-dataset'/'versions'/'2'/'COD10K-v3') in r.stdout, r.stderr
    r = run('data-check', '--dataset-path', '/kaggle/input/cod10k-dataset/COD10K-v3', env=env)  # another mount scheme
    assert r.returncode == 0 and 'versions/2/COD10K-v3' in r.stdout, r.stderr


def test_data_check_synthetic_on_the_fly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('CODSEG_CACHE', str(tmp_path/'cache'))
    rc, out, _ = cli(capsys, 'data-check', '--dataset-path', 'synthetic', '--synthetic-n', 12, '--synthetic-size', 48)
    assert rc == 0 and 'training 11, validation 1 (seeded' in out and str(tmp_path/'cache') in out
