"""Truncated and damaged images, as a user meets them: `data-check` names them from their end markers; `train`,
`evaluate` and `predict` stop with one line naming the file (exit 1, no traceback, no OpenCV warning), or leave them
out with `--skip-bad`."""
import shutil, subprocess, sys
from pathlib import Path
import cv2, numpy as np, pytest
from codseg.cli import main

TINY = ['--img-size', '48', '--backbone', 'edgenext_xx_small', '--no-pretrained', '--num-experts', '3',
        '--batch-size', '8', '--num-workers', '1', '--device', 'cpu']
STEM = 'COD10K-CAM-1-Aquatic-1-Synthetic-000'


def cut(path: Path, ext: str) -> Path:
    "Re-save image `path` as `ext` (a valid file written by OpenCV), then cut off its last quarter; the new path."
    new = path.with_suffix(ext)
    assert cv2.imwrite(str(new), cv2.imread(str(path)))
    if new != path: path.unlink()
    b = new.read_bytes()
    new.write_bytes(b[:len(b) * 3 // 4])
    return new


def hurt(path: Path) -> Path:
    "Flip a byte in the middle of PNG `path`: its end stays whole (the header check passes), its data is damaged."
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))
    return path


def cli(capfd, *args):
    "Run `codseg ARGS` in this process; (status, stdout, stderr), stderr caught at the file descriptor (OpenCV's)."
    rc = main([str(a) for a in args])
    out = capfd.readouterr()
    return rc, out.out, out.err


def one_line_naming(err: str, *files) -> bool:
    "Whether stderr `err` is one line naming every file of `files`, advising --skip-bad, with no traceback or warning."
    return (len(err.strip().splitlines()) == 1 and all(str(f) in err for f in files) and '--skip-bad' in err
            and 'Traceback' not in err and 'WARN' not in err and 'libpng' not in err)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A synthetic dataset with a truncated JPEG and a truncated PNG in Train, and both kinds in Test."
    d = tmp_path_factory.mktemp('bad')/'data'
    r = subprocess.run([sys.executable, '-m', 'codseg', 'make-synthetic', d, '--n', '24', '--size', '48'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    train, test = d/'Train'/'Image', d/'Test'/'Image'
    bad = dict(train_jpg=cut(train/f'{STEM}03.png', '.jpg'), train_png=cut(train/f'{STEM}05.png', '.png'),
               test_jpg=cut(test/f'{STEM}26.png', '.jpg'), test_png=cut(test/f'{STEM}27.png', '.png'))
    return d, bad


@pytest.fixture(scope='module')
def ckpt(data, tmp_path_factory):
    "A tiny checkpoint trained with --skip-bad on the damaged dataset."
    out = tmp_path_factory.mktemp('run')
    assert main(['train', '--dataset-path', str(data[0]), *TINY, '--epochs', '1', '--stage1-epochs', '1',
                 '--num-workers', '0', '--checkpoint-dir', str(out), '--skip-bad']) == 0
    return out/'best_model.pth'


def test_data_check_names_truncated_files(data, capfd):
    d, bad = data
    rc, out, err = cli(capfd, 'data-check', '--dataset-path', d)
    assert rc == 1 and 'training would stop' in out and 'WARN' not in out + err
    for f in bad.values(): assert f'damaged image {f} (truncated: the' in out, f
    assert 'the JPEG stops before its end marker FFD9' in out and 'the PNG stops before its IEND chunk' in out
    rc, out, _ = cli(capfd, 'data-check', '--dataset-path', d, '--skip-bad')
    assert rc == 0 and 'leaves the bad pairs out' in out


def test_train_stops_naming_the_file_or_skips_it(data, ckpt, tmp_path, capfd):
    d, bad = data
    rc, out, err = cli(capfd, 'train', '--dataset-path', d, *TINY, '--epochs', '1', '--stage1-epochs', '1',
                       '--checkpoint-dir', tmp_path/'run')
    assert rc == 1 and one_line_naming(err, bad['train_jpg']), err
    assert ckpt.is_file()  # the fixture trained with --skip-bad


def test_a_file_damaged_inside_stops_in_the_worker_with_one_line(data, tmp_path, capfd):
    "The header check passes, the DataLoader worker meets the damage: the main process prints one line."
    d = tmp_path/'data'
    shutil.copytree(data[0], d)
    for f in data[1].values(): (d/f.relative_to(data[0])).unlink()
    png = hurt(d/'Train'/'Image'/f'{STEM}07.png')
    args = ['train', '--dataset-path', d, *TINY, '--epochs', '1', '--stage1-epochs', '1']
    rc, _, err = cli(capfd, *args, '--checkpoint-dir', tmp_path/'run')
    assert rc == 1 and one_line_naming(err, png) and 'fails its checksum' in err, err
    rc, _, err = cli(capfd, *args, '--checkpoint-dir', tmp_path/'run2', '--skip-bad')
    assert rc == 0 and 'Traceback' not in err and 'WARN' not in err  # the worker warned about it (not caught here)


def test_evaluate_stops_naming_the_file_or_skips_it(data, ckpt, tmp_path, capfd):
    d, bad = data
    args = ['evaluate', '--checkpoint', ckpt, '--dataset-path', d, '--output', tmp_path, '--device', 'cpu',
            '--num-workers', '1']
    rc, _, err = cli(capfd, *args)
    assert rc == 1 and one_line_naming(err, bad['test_jpg']), err
    rc, out, err = cli(capfd, *args, '--skip-bad')
    assert rc == 0 and 'left out 2 bad pair(s) of COD10K' in out and 'WARN' not in err
    assert 'COD10K        4' in out  # 6 test images, 2 truncated


def test_predict_accepts_skip_bad(data, ckpt, tmp_path, capfd):
    d, bad = data
    ins = tmp_path/'in'
    shutil.copytree(d/'Test'/'Image', ins)
    args = ['predict', '--checkpoint', ckpt, '--input', ins, '--device', 'cpu', '--num-workers', '1']
    rc, _, err = cli(capfd, *args, '--output', tmp_path/'a')
    assert rc == 1 and one_line_naming(err, ins/bad['test_jpg'].name) and not (tmp_path/'a').exists(), err
    rc, out, err = cli(capfd, *args, '--output', tmp_path/'b', '--skip-bad', '--num-workers', '0')
    assert rc == 0 and 'left out 2 bad image(s)' in out and 'WARN' not in err
    assert sorted(p.stem for p in (tmp_path/'b').glob('*.png')) == sorted(p.stem for p in ins.glob('*.png')
                                                                         if p.name != bad['test_png'].name)
    for f in bad.values(): (ins/f.name).unlink(missing_ok=True)
    png = hurt(next(ins.glob('*.png')))  # damaged inside: met in the worker without --skip-bad, decoded first with it
    rc, _, err = cli(capfd, *args, '--output', tmp_path/'c')
    assert rc == 1 and one_line_naming(err, png), err
    rc, out, err = cli(capfd, *args, '--output', tmp_path/'d', '--skip-bad', '--num-workers', '0')
    assert rc == 0 and 'left out 1 bad image(s)' in out and 'WARN' not in err


def test_opencv_stays_quiet(tmp_path):
    "Reading a truncated file through codseg prints nothing; OpenCV's own warnings are off once codseg.image is in."
    png = cut(tmp_path/'x.png', '.png') if cv2.imwrite(str(tmp_path/'x.png'), np.zeros((30, 40, 3), np.uint8)) else None
    code = ('import numpy as np, cv2, codseg.image as im\n'
            f'try: im.read_image({str(png)!r})\nexcept im.DataError as e: print(e)\n'
            f'cv2.imdecode(np.fromfile({str(png)!r}, np.uint8), cv2.IMREAD_COLOR)\n')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'truncated' in r.stdout and str(png) in r.stdout
    assert '[ WARN' not in r.stderr, r.stderr
