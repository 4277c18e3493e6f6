"""Issue 25, held out: nothing lost, nothing silent, nothing late. One test per finding, each the exact case a user met,
run through the command line (`python -m codseg ...` in a subprocess), with the line it must print and its exit status."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import cv2, numpy as np, pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--backbone', 'edgenext_xx_small', '--no-pretrained', '--img-size', '64', '--num-workers', '0', '--device', 'cpu',
        '--num-experts', '3', '--epochs', '2', '--stage1-epochs', '1', '--batch-size', '4', '--accumulation-steps', '1']
CAM = 'COD10K-CAM-1-Aquatic-1-Synthetic-{:05d}.png'

def env(**extra) -> dict:
    "The environment of a run: this checkout first on the path, one thread, a private cache, no proxy."
    e = {k: v for k, v in os.environ.items() if k.lower() not in ('https_proxy', 'http_proxy', 'hf_endpoint')}
    return {**e, 'PYTHONPATH': os.pathsep.join([str(ROOT), e.get('PYTHONPATH', '')]), 'OMP_NUM_THREADS': '1', **extra}

def codseg(*args, timeout=300, cwd=None, python=None, **extra):
    "Run `python -m codseg ARGS` (or `python -c PYTHON ARGS`): (exit status, stdout, stderr, seconds)."
    cmd = [sys.executable, *(['-c', python] if python else ['-m', 'codseg']), *map(str, args)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env(**extra))
    return r.returncode, r.stdout, r.stderr, time.perf_counter() - t

def one_line(err: str, command: str = 'train') -> str:
    "The single line of `err`, checked to be one line starting with 'codseg COMMAND: ' and without a traceback."
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'codseg {command}: ') and 'Traceback' not in err, err[-3000:]
    return lines[0]

@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    "A private synthetic-data cache for the module's runs."
    return str(tmp_path_factory.mktemp('cache'))

def synthetic(d: Path, n=12) -> Path:
    "A fresh synthetic dataset in the COD10K-v3 layout (n camouflaged training images of 64 px)."
    rc, out, err, _ = codseg('make-synthetic', d, '--n', n, '--size', 64, timeout=120)
    assert rc == 0, err
    return d

def put_mask(f: Path, a):
    "Overwrite mask file `f` with array `a` (uint8)."
    assert cv2.imwrite(str(f), np.asarray(a, np.uint8))

def val_mask(root: Path) -> Path:
    "The mask of the (only) validation image the default seeded split holds out of `root`."
    from codseg.config import Config
    from codseg.roles import train_val_pairs
    return train_val_pairs(Config(dataset_path=str(root)))[1][0].mask

# ---------------------------------------------------------------- 2. degenerate data named before training

def test_black_masks_named_by_data_check(tmp_path):
    "All-black masks: data-check (and --decode) reports them and says training would stop, exit 1 (was: no problems)."
    ds = synthetic(tmp_path/'black')
    for f in ds.glob('*/GT_Object/*.png'): put_mask(f, np.zeros((64, 64)))
    for decode in ([], ['--decode']):
        rc, out, err, _ = codseg('data-check', '--dataset-path', ds, *decode)
        assert rc == 1 and 'no problems found' not in out, out
        assert 'read the masks: training 11 empty; validation 1 empty; COD10K 3 empty' in out, out
        assert f"all 11 training masks are empty (no object), in {ds/'Train'/'GT_Object'}" in out, out
    rc, out, _, _ = codseg('data-check', '--dataset-path', ds, '--json')
    js = json.loads(out)
    assert rc == 1 and not js['would_train'] and len(js['masks']['training']['empty']) == 11, js['masks']

def test_black_masks_refused_by_train(tmp_path, cache):
    "train on all-black masks: one line naming the mask folder and the fix, exit 1, before any model or checkpoint (was: IoU 1.0)."
    ds = synthetic(tmp_path/'black')
    for f in ds.glob('*/GT_Object/*.png'): put_mask(f, np.zeros((64, 64)))
    for extra in ([], ['--allow-empty-masks']):  # no object at all is never a training set
        rc, out, err, secs = codseg('train', '--dataset-path', ds, *TINY, '--checkpoint-dir', tmp_path/'ck', *extra,
                                    CODSEG_CACHE=cache)
        line = one_line(err)
        assert rc == 1 and f"all 11 training masks are empty (no object), in {ds/'Train'/'GT_Object'}" in line, line
        assert 'Is that the mask folder? Fix: point --dataset-path at a dataset whose masks mark the objects' in line
        assert not (tmp_path/'ck').exists() and 'IoU' not in out, out

def test_full_and_non_binary_masks_refused_or_skipped(tmp_path, cache):
    "An all-white mask and a photo saved as a mask: train names them and --skip-bad, exit 1; data-check lists both."
    ds = synthetic(tmp_path/'odd')
    put_mask(ds/'Train'/'GT_Object'/CAM.format(2), np.full((64, 64), 255))
    put_mask(ds/'Train'/'GT_Object'/CAM.format(3), np.random.default_rng(0).integers(0, 256, (64, 64, 3)))
    rc, out, err, _ = codseg('train', '--dataset-path', ds, *TINY, '--checkpoint-dir', tmp_path/'ck', CODSEG_CACHE=cache)
    line = one_line(err)
    assert rc == 1 and 'training mask(s) cannot be used, e.g. full mask' in line and CAM.format(2) in line, line
    assert CAM.format(3) in line and '--skip-bad' in line and not (tmp_path/'ck').exists()
    rc, out, err, _ = codseg('data-check', '--dataset-path', ds)
    assert rc == 1 and 'full mask' in out and 'not binary mask' in out and 'grey pixels' in out, out

def test_some_empty_masks_need_allow_empty_masks(tmp_path, cache):
    "Two empty masks (one in validation): refused without --allow-empty-masks; with it the epoch line says so."
    ds = synthetic(tmp_path/'some')
    v = val_mask(ds)
    put_mask(v, np.zeros((64, 64)))
    put_mask(next(f for f in sorted((ds/'Train'/'GT_Object').glob('*CAM*')) if f != v), np.zeros((64, 64)))
    rc, out, err, _ = codseg('train', '--dataset-path', ds, *TINY, '--checkpoint-dir', tmp_path/'ck', CODSEG_CACHE=cache)
    line = one_line(err)
    assert rc == 1 and '1 training mask(s) are empty (no object)' in line and '--allow-empty-masks' in line, line
    rc, out, err, _ = codseg('train', '--dataset-path', ds, *TINY, '--checkpoint-dir', tmp_path/'ck',
                             '--allow-empty-masks', CODSEG_CACHE=cache)
    assert rc == 0, err[-3000:]
    epochs = [l for l in out.splitlines() if l.startswith('Epoch ')]
    assert len(epochs) == 2 and all('| Empty masks: 1 (IoU 1 where nothing predicted)' in l for l in epochs), out
    assert 'empty_masks' in (tmp_path/'ck'/'history.csv').read_text().splitlines()[0]

def test_evaluate_says_when_masks_are_empty(tmp_path, cache):
    "evaluate on a test set with an empty mask: the table is followed by a line saying how many and what IoU means there."
    ds = synthetic(tmp_path/'ev')
    rc, out, err, _ = codseg('train', '--dataset-path', ds, *TINY, '--checkpoint-dir', tmp_path/'ck', CODSEG_CACHE=cache)
    assert rc == 0, err[-3000:]
    put_mask(ds/'Test'/'GT_Object'/CAM.format(13), np.zeros((64, 64)))
    rc, out, err, _ = codseg('evaluate', '--checkpoint', tmp_path/'ck'/'best_model.pth', '--dataset-path', ds,
                             '--output', tmp_path/'out', '--device', 'cpu', '--num-workers', 0, CODSEG_CACHE=cache)
    assert rc == 0 and 'COD10K: 1 of 3 masks are empty (no object); IoU and Dice count 1' in out, out + err
    rows = json.loads((tmp_path/'out'/'eval_best_model.json').read_text())['results']
    assert rows[0]['empty_masks'] == 1

# ---------------------------------------------------------------- 5. everything checkable is checked first

def test_images_only_folder_told_masks_are_missing(tmp_path):
    "A folder of images and no masks: 'no masks in', the images folder named, exit 2 (was: a circular 'point at these')."
    ds = synthetic(tmp_path/'ds')
    (tmp_path/'only'/'images').mkdir(parents=True)
    for f in (ds/'Train'/'Image').glob('*.png'): (tmp_path/'only'/'images'/f.name).write_bytes(f.read_bytes())
    rc, out, err, secs = codseg('train', '--dataset-path', tmp_path/'only', *TINY)
    line = one_line(err)
    assert rc == 2 and line.startswith(f"codseg train: no masks in {tmp_path/'only'}: folders holding images: images/, but no mask "
                                 'folder beside them')
    assert 'Fix: add the masks' in line and 'point --dataset-path at the folder holding these' not in line, line

def test_size_mismatch_named_before_the_model(tmp_path, cache):
    "A mask of another size: named with the fix, exit 1, before torch is imported."
    ds = synthetic(tmp_path/'mism')
    put_mask(ds/'Train'/'GT_Object'/CAM.format(1), np.zeros((40, 40)))
    probe = ('import sys; from codseg.cli import main; rc = main(sys.argv[1:]); '
             "print('TORCH', 'torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    rc, out, err, secs = codseg('train', '--dataset-path', ds, *TINY, python=probe, CODSEG_CACHE=cache)
    assert rc == 1 and 'size mismatch: image' in err and 'is 64x64 (WxH) but its mask' in err and '40x40' in err, err
    assert 'TORCH False' in err, err

@pytest.mark.parametrize('logger', ['tensorboard', 'wandb'])
def test_logger_package_missing_refused_first(logger, tmp_path):
    "--logger X without its package: one line with the install command, exit 2, before any data or model."
    probe = f"import sys; sys.modules[{logger!r}] = None; from codseg.cli import main; sys.exit(main(sys.argv[1:]))"
    rc, out, err, secs = codseg('train', '--dataset-path', 'synthetic', '--logger', f'csv,{logger}', python=probe,
                                cwd=tmp_path)
    line = one_line(err)
    assert rc == 2 and f'--logger {logger} needs the {logger} package: pip install' in line and secs < 5, (line, secs)

def test_t0_checked_on_the_real_training_size(tmp_path, cache):
    "--t0 shorter than one optimizer step on this data: refused before the model is built, exit 2."
    ds = synthetic(tmp_path/'ds')
    rc, out, err, secs = codseg('train', '--dataset-path', ds, *TINY, '--scheduler', 'cosine_restart', '--t0', 0.01,
                                '--checkpoint-dir', tmp_path/'ck', CODSEG_CACHE=cache)
    line = one_line(err)
    assert rc == 2 and '--t0 0.01 gives a first restart cycle of 0.03 optimizer steps' in line and secs < 10, (line, secs)
    assert not (tmp_path/'ck').exists()

def test_img_size_has_an_upper_bound():
    "--img-size 100000: one line at once, exit 2 (was: OpenCV's allocation error after 39 s)."
    rc, out, err, secs = codseg('train', '--dataset-path', 'synthetic', '--img-size', 100000)
    assert rc == 2 and one_line(err) == 'codseg train: --img-size 100000 must be between 32 and 4096 (pixels)'
    assert secs < 5, secs

@pytest.mark.parametrize('how', ['no network', 'HF_HUB_OFFLINE'])
def test_offline_pretrained_gives_up_in_seconds(how, tmp_path, cache):
    "The default --pretrained with no way to the hub and nothing cached: the fix in one line within seconds (was: 51 s)."
    ds = synthetic(tmp_path/'ds')
    args = [a for a in TINY if a != '--no-pretrained']
    net = {'HF_ENDPOINT': 'https://no-such-host.invalid'} if how == 'no network' else {'HF_HUB_OFFLINE': '1'}
    rc, out, err, secs = codseg('train', '--dataset-path', ds, *args, '--checkpoint-dir', tmp_path/'ck',
                                HF_HUB_CACHE=str(tmp_path/'hub'), CODSEG_CACHE=cache, **net)
    line = one_line(err)
    why = 'no connection to the hub within 3 s' if how == 'no network' else 'HF_HUB_OFFLINE is set'
    assert rc == 1 and f'({why}, and they are not in the local cache)' in line, line
    assert '--pretrained-path FILE' in line and '--no-pretrained' in line and secs < 30, (line, secs)

# ---------------------------------------------------------------- 8. the plan tells the truth

def test_plan_with_a_batch_larger_than_the_data():
    "lr-preview --train-size 11 --batch-size 16 --accumulation-steps 4: the real effective batch, and a warning."
    rc, out, err, _ = codseg('lr-preview', '--train-size', 11, '--batch-size', 16, '--accumulation-steps', 4,
                             '--epochs', 4, '--stage1-epochs', 1)
    assert rc == 0, err
    assert 'effective batch 64 asked, but each optimizer step sees only 11 (all 11 training items)' in out, out
    assert 'Peak LR / effective batch: Stage 1 0.00025 / 11 = 2.27273e-05' in out, out
    assert out.strip().splitlines()[-1].startswith('WARNING: the effective batch is larger than the training data'), out
    rc, out, err, _ = codseg('lr-preview', '--train-size', 100, '--batch-size', 2, '--accumulation-steps', 4)
    assert rc == 0 and 'asked' not in out and 'WARNING' not in out and 'effective batch 8\n' in out, out

# ---------------------------------------------------------------- 9. messages

def test_image_folder_given_points_at_the_root(tmp_path):
    "--dataset-path .../Train/Image: the fix names the dataset root (was: 'point at the folder holding these')."
    ds = synthetic(tmp_path/'COD10K-v3')
    rc, out, err, _ = codseg('data-check', '--dataset-path', ds/'Train'/'Image')
    line = one_line(err, 'data-check')
    assert rc == 2 and line.endswith(f'Fix: pass --dataset-path {ds}') and '(COD10K-v3 layout)' in line, line

def test_pretrained_alone_is_the_default(tmp_path, cache):
    "--pretrained on its own: accepted as the default it is (was: 'argument --pretrained-path: expected one argument')."
    ds = synthetic(tmp_path/'ds')
    rc, out, err, _ = codseg('train', '--dataset-path', ds, *[a for a in TINY if a != '--no-pretrained'], '--pretrained',
                             '--dry-run', '--checkpoint-dir', tmp_path/'ck', CODSEG_CACHE=cache)
    assert rc == 0 and 'expected one argument' not in err and '"pretrained": true' in out, err[-2000:]

def test_wrong_pretrained_path_file_in_whole_sentences(tmp_path, cache):
    "--pretrained-path with another model's weights, or junk: one line that ends with its fix, nothing cut."
    import torch
    ds = synthetic(tmp_path/'ds')
    torch.save({'conv1.weight': torch.zeros(8, 3, 7, 7), 'fc.weight': torch.zeros(10, 8)}, tmp_path/'other.pth')
    (tmp_path/'junk.pth').write_bytes(b'not weights')
    for f, words in (('other.pth', "these are not weights of backbone 'edgenext_xx_small' (156 of its 156 weights are "
                                   'not in the file, e.g. stem_0.weight; 2 entries of the file are none of its weights'),
                     ('junk.pth', 'not a readable weights file')):
        rc, out, err, _ = codseg('train', '--dataset-path', ds, *TINY, '--pretrained-path', tmp_path/f,
                                 '--checkpoint-dir', tmp_path/'ck', CODSEG_CACHE=cache)
        line = one_line(err)
        assert rc == 1 and words in line and line.endswith('--no-pretrained') and '...' not in line, line

def test_letter_case_matched_or_named(tmp_path):
    "A dataset folder typed in another letter case is found; a checkpoint file so typed gets 'did you mean'."
    ds = synthetic(tmp_path/'COD10K-v3')
    rc, out, err, _ = codseg('data-check', '--dataset-path', tmp_path/'cod10k-V3')
    assert rc == 0 and f'dataset: {ds}' in out, out + err
    rc, out, err, _ = codseg('train', '--dataset-path', ds, *TINY, '--val-path', 'cod10k', '--allow-test-training',
                             '--dry-run', '--checkpoint-dir', tmp_path/'ck', CODSEG_CACHE=str(tmp_path/'cache'))
    assert rc == 0 and 'COD10K: val (--val-path COD10K' in out, out + err  # a set named in any case
    (tmp_path/'last.pth').write_bytes(b'x')
    rc, out, err, _ = codseg('train', '--dataset-path', ds, '--resume-from', tmp_path/'LAST.pth')
    assert rc == 2 and f"did you mean {tmp_path/'last.pth'}?" in one_line(err), err

def test_skip_bad_lists_every_pair_left_out(tmp_path, cache):
    "--skip-bad with three bad pairs: the banner names each one, and CHECKPOINT_DIR/skipped.txt holds them all."
    ds = synthetic(tmp_path/'bad')
    cut = ds/'Train'/'Image'/CAM.format(1)
    cut.write_bytes(cut.read_bytes()[:-100])  # truncated
    put_mask(ds/'Train'/'GT_Object'/CAM.format(2), np.zeros((40, 40)))  # another size
    put_mask(ds/'Train'/'GT_Object'/CAM.format(3), np.full((64, 64), 255))  # all object
    rc, out, err, _ = codseg('train', '--dataset-path', ds, *TINY, '--skip-bad', '--checkpoint-dir', tmp_path/'ck',
                             CODSEG_CACHE=cache)
    assert rc == 0, err[-3000:]
    assert f"--skip-bad: left out 3 bad pair(s), all listed in {tmp_path/'ck'/'skipped.txt'}" in out, out
    assert all(CAM.format(i) in out for i in (1, 2, 3)), out
    listed = (tmp_path/'ck'/'skipped.txt').read_text().splitlines()
    assert len(listed) == 3 and all(any(CAM.format(i) in l for l in listed) for i in (1, 2, 3)), listed

KILL_AFTER_5 = '''
import os, signal, sys
import codseg.synthetic as S
real, n = S.png_bytes, []
def png_bytes(a):
    if len(n) == 5: os.kill(os.getpid(), signal.SIGKILL)  # the session ends mid-write
    n.append(1)
    return real(a)
S.png_bytes = png_bytes
S.make_synthetic_cli(sys.argv[1:])
'''

def test_make_synthetic_stopped_is_redone(tmp_path):
    "make-synthetic killed mid-write: the next run redoes its own folder, exit 0, the same files as a fresh one."
    rc, *_ = codseg(tmp_path/'stopped', '--n', 12, '--size', 64, python=KILL_AFTER_5)
    assert rc == -signal.SIGKILL and any((tmp_path/'stopped').rglob('*.png'))
    rc, out, err, _ = codseg('make-synthetic', tmp_path/'stopped', '--n', 12, '--size', 64)
    assert rc == 0 and 'redoing the synthetic dataset a stopped make-synthetic left there' in out, out + err
    synthetic(tmp_path/'fresh')
    files = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}
    assert files(tmp_path/'stopped') == files(tmp_path/'fresh')
    (tmp_path/'mine').mkdir(); (tmp_path/'mine'/'notes.txt').write_text('x')  # a folder it did not make: still refused
    rc, out, err, _ = codseg('make-synthetic', tmp_path/'mine', '--n', 12, '--size', 64)
    assert rc == 2 and 'never overwrites' in err

def test_chameleon_under_a_train_folder_stays_a_test_set(tmp_path):
    "data/Train/CHAMELEON/{Image,GT} beside COD10K: CHAMELEON is tested, never trained on without --allow-test-training."
    data = tmp_path/'data'
    ds = synthetic(data/'COD10K-v3')
    for sub, dst in (('Image', 'Image'), ('GT_Object', 'GT')):
        (data/'Train'/'CHAMELEON'/dst).mkdir(parents=True)
        for f in sorted((ds/'Test'/sub).glob('*.png')):
            (data/'Train'/'CHAMELEON'/dst/f.name.replace('COD10K-CAM-1-Aquatic-1-Synthetic', 'animal')).write_bytes(f.read_bytes())
    rc, out, err, _ = codseg('data-check', '--dataset-path', data, '--json')
    js = json.loads(out)
    assert rc == 0 and js['roles']['CHAMELEON']['role'] == 'test' and js['test']['CHAMELEON'] == 3, js['roles']
    assert js['train'] + js['val'] == 12
    rc, out, err, _ = codseg('data-check', '--dataset-path', data, '--train-sets', 'COD10K-train,chameleon')
    assert rc == 2 and 'CHAMELEON is a test set of the field' in err and '--allow-test-training' in err, err
    rc, out, err, _ = codseg('data-check', '--dataset-path', data, '--train-sets', 'COD10K-train,CHAMELEON',
                             '--allow-test-training', '--json')
    assert rc == 0 and json.loads(out)['test_trained'] == ['CHAMELEON'], out

# ---------------------------------------------------------------- 9, 10. the docs

def test_docs_name_what_users_asked_about():
    "CODSEG_KAGGLE_INPUT is documented; the README's test command shows skip reasons; the demo's LR is explained."
    readme, kaggle = (ROOT/'README.md').read_text(), (ROOT/'kaggle'/'README.md').read_text()
    assert 'CODSEG_KAGGLE_INPUT' in readme and 'CODSEG_KAGGLE_INPUT' in kaggle
    test_cmd = readme.split('<!-- ci:test -->')[1].split('```')[1]
    assert 'pytest -q -rs' in test_cmd, test_cmd
    after_demo = readme.split('<!-- ci:demo -->')[1].split('<!-- ci:test -->')[0].split('```')[2]
    assert 'Its `--lr 0.002` is 8x the rule of thumb the plan quotes' in after_demo, after_demo
