"The command line as a new user meets it: fast --help, flags checked before anything heavy, one line per error, exit codes."
import errno, os, subprocess, sys, time
from pathlib import Path
import cv2, numpy as np, pytest

COMMANDS = ['train', 'lr-preview', 'data-check', 'make-synthetic', 'evaluate', 'predict', 'find-lr']

def codseg(*args, cwd=None):
    "Run `python -m codseg ARGS`: (exit status, stdout, stderr, seconds)."
    t = time.perf_counter()
    r = subprocess.run([sys.executable, '-m', 'codseg', *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=120)
    return r.returncode, r.stdout, r.stderr, time.perf_counter() - t

NO_HEAVY = '''
import sys, time
from codseg.cli import main
t = time.perf_counter()
try: main([{cmd!r}, '--help'])
except SystemExit: pass
heavy = sorted(m for m in ('torch', 'timm', 'cv2', 'albumentations') if m in sys.modules)
print('HEAVY', heavy, time.perf_counter() - t, file=sys.stderr)
'''

@pytest.mark.parametrize('cmd', COMMANDS)
def test_help_is_fast_and_imports_nothing_heavy(cmd):
    "`codseg X --help` imports neither torch, timm nor OpenCV, and answers in under 1 s (best of 3)."
    r = subprocess.run([sys.executable, '-c', NO_HEAVY.format(cmd=cmd)], capture_output=True, text=True, timeout=60)
    assert 'HEAVY []' in r.stderr and 'usage: codseg' in r.stdout, r.stderr[-2000:]
    best = min(codseg(cmd, '--help')[3] for _ in range(3))
    assert best < 1.0, f'codseg {cmd} --help took {best:.2f} s'

BAD = {  # a bad setting in each command, and what its one line must name
    'train': (['--dataset-path', 'synthetic', '--stage1-epochs', '30', '--epochs', '6'], '--stage1-epochs 30 is above --epochs 6'),
    'lr-preview': (['--train-size', '100', '--stage1-epochs', '30', '--epochs', '6'], '--stage1-epochs 30 is above --epochs 6'),
    'find-lr': (['--dataset-path', 'synthetic', '--stage1-epochs', '30', '--epochs', '6'], '--stage1-epochs 30 is above'),
    'data-check': (['--dataset-path', '/no/such/COD10K'], '/no/such/COD10K'),
    'make-synthetic': (['out', '--n', '-3'], '--n'),
    'evaluate': (['--checkpoint', 'missing.pth', '--dataset-path', 'synthetic'], '--checkpoint missing.pth: no such file'),
    'predict': (['--checkpoint', 'missing.pth', '--input', '.', '--output', 'o'], '--checkpoint missing.pth: no such file'),
}

@pytest.mark.parametrize('cmd', COMMANDS)
def test_bad_setting_one_line_exit_2_fast(cmd, tmp_path):
    "A bad setting: exit 2 within 2 s, one line on stderr that names the flag, no traceback, nothing written."
    argv, names = BAD[cmd]
    rc, out, err, secs = codseg(cmd, *argv, cwd=tmp_path)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and names in lines[0] and lines[0].startswith(f'codseg {cmd}: '), (rc, out, err)
    assert secs < 2.0, f'{secs:.2f} s'
    assert list(tmp_path.iterdir()) == []

REQUIRED = {'evaluate': ['--checkpoint', 'c.pth'], 'predict': ['--checkpoint', 'c.pth', '--input', '.', '--output', 'o']}

@pytest.mark.parametrize('cmd', ['train', 'lr-preview', 'find-lr', 'evaluate', 'predict', 'data-check'])
def test_unknown_flag_one_line(cmd):
    "A misspelt flag: exit 2, one line with the nearest flag, not the whole usage."
    typo, flag = ('--dataset-pth', '--dataset-path') if cmd == 'data-check' else ('--num-wokers', '--num-workers')
    rc, out, err, _ = codseg(cmd, *REQUIRED.get(cmd, []), typo, '0')
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f'did you mean {flag}' in err, err

def synthetic_dataset(d: Path) -> Path:
    "A tiny COD10K-v3-layout folder (made by make-synthetic)."
    rc, out, err, _ = codseg('make-synthetic', d, '--n', 8, '--size', 32)
    assert rc == 0, err
    return d

def test_no_output_inside_an_input(tmp_path):
    "--checkpoint-dir, --cache-dir, --png and --csv inside the dataset folder are refused (exit 2) and nothing is written."
    ds = synthetic_dataset(tmp_path/'COD10K-v3')
    (tmp_path/'c.pth').write_bytes(b'')
    before = sorted(p for p in ds.rglob('*'))
    for cmd, flag, extra in (('train', '--checkpoint-dir', []), ('train', '--cache-dir', []), ('find-lr', '--png', []),
                             ('find-lr', '--checkpoint-dir', []), ('lr-preview', '--csv', []), ('lr-preview', '--png', []),
                             ('evaluate', '--output', ['--checkpoint', tmp_path/'c.pth']),
                             ('evaluate', '--save-predictions', ['--checkpoint', tmp_path/'c.pth'])):
        target = ds/'out'/('x.png' if flag in ('--png', '--csv') else 'dir')
        rc, out, err, secs = codseg(cmd, '--dataset-path', ds, flag, target, *extra)
        assert rc == 2 and f'{flag} {target} is inside the input --dataset-path' in err and secs < 2, (cmd, flag, err)
    rc, out, err, _ = codseg('predict', '--checkpoint', ds/'Train'/'Image'/os.listdir(ds/'Train'/'Image')[0], '--input',
                             ds/'Train'/'Image', '--output', ds/'Train'/'Image'/'maps')
    assert rc == 2 and '--output' in err and 'inside the input --input' in err, err
    ck_inside = ds/'Train'/'Image'/os.listdir(ds/'Train'/'Image')[0]
    rc, out, err, _ = codseg('evaluate', '--checkpoint', ck_inside, '--dataset-path', ds)  # results beside the checkpoint
    assert rc == 2 and 'pass --output DIR outside the dataset' in err, err
    assert sorted(p for p in ds.rglob('*')) == before

def test_debug_shows_the_traceback(tmp_path):
    "--debug (before or after the command) prints the traceback as well as the line."
    for argv in (['--debug', 'train'], ['train', '--debug']):
        rc, out, err, _ = codseg(*argv, '--epochs', '0', cwd=tmp_path)
        assert rc == 2 and 'Traceback' in err and err.strip().splitlines()[-1] == 'codseg train: --epochs 0 must be at least 1'

def test_errors_map_to_one_line_and_exit_status():
    "Disk errors name the path; PyTorch's unpickling advice never passes through; 'nothing left to train' is success."
    from codseg.cli import describe, UsageError
    from codseg.schedule import PlanComplete, PlanError
    for code, words in ((errno.ENOSPC, 'no space left'), (errno.EROFS, 'read-only'), (errno.EACCES, 'permission denied')):
        msg, rc = describe(OSError(code, os.strerror(code), '/ck/last.pth'))
        assert rc == 1 and msg.startswith('/ck/last.pth: ') and words in msg and '\n' not in msg
    msg, rc = describe(RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456'))
    assert rc == 1 and 'disk is full' in msg
    msg, rc = describe(RuntimeError("--resume-from x.pth: not a readable checkpoint (UnpicklingError: Weights only load "
                                    "failed.\nRe-running `torch.load` with `weights_only` set to `False` will likely "
                                    "succeed); pass another file"))
    assert rc == 1 and 'weights_only' not in msg and 'False' not in msg and '\n' not in msg, msg
    msg, rc = describe(PlanComplete(6, 6))  # by its type, not its text: a look-alike PlanError is a usage error
    assert rc == 0 and msg.startswith('already complete: ') and 'raise --epochs to continue' in msg, msg
    assert describe(PlanError('nothing left to train (not a PlanComplete)'))[1] == 2
    assert describe(UsageError('--lr -1 ...'))[1] == 2 and describe(PlanError('--t0 0 ...'))[1] == 2
    assert describe(KeyError('x'))[1] == 1 and '--debug' in describe(KeyError('x'))[0]

def test_evaluate_predict_checkpoint_errors_one_prefix(tmp_path):
    "A corrupt --checkpoint: one line naming --checkpoint once (no '--resume-from' inside), exit 1."
    bad = tmp_path/'bad.pth'; bad.write_bytes(b'not a checkpoint')
    (tmp_path/'in').mkdir(); cv2.imwrite(str(tmp_path/'in'/'a.png'), np.zeros((8, 8, 3), np.uint8))  # a good image
    for cmd, extra in (('evaluate', ['--dataset-path', 'synthetic']),
                       ('predict', ['--input', tmp_path/'in', '--output', tmp_path/'out'])):
        rc, out, err, _ = codseg(cmd, '--checkpoint', bad, '--device', 'cpu', *extra)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].count('--checkpoint') == 1 and '--resume-from' not in err, err

@pytest.mark.parametrize('kind', ['missing', 'empty', 'file'])
def test_lr_preview_bad_dataset_path(kind, tmp_path):
    "The README's first lr-preview on a machine without that dataset: one line naming the path, exit 2, no traceback."
    p = tmp_path/kind
    if kind == 'empty': p.mkdir()
    if kind == 'file': p.write_text('x')
    rc, out, err, secs = codseg('lr-preview', '--dataset-path', p, '--epochs', 10, '--stage1-epochs', 2)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(p) in err and 'Traceback' not in err and secs < 2, err

def test_read_only_checkpoint_dir_refused_early(tmp_path):
    "A --checkpoint-dir that cannot be written (here under /proc) is refused before anything heavy, naming the flag."
    rc, out, err, secs = codseg('train', '--dataset-path', 'synthetic', '--checkpoint-dir', '/proc/1/codseg-ck')
    assert rc == 2 and err.startswith('codseg train: --checkpoint-dir /proc/1/codseg-ck') and 'not writable' in err, err

def test_check_settings_asks_the_plan(monkeypatch):
    "check_settings refuses through schedule.check_plan (the plan's own checks, not a copy): its PlanError, exit 2."
    import codseg.schedule as schedule
    from codseg.cli import check_settings, UsageError
    from codseg.flags import train_parser
    def refuse(s, n_train=1, world_size=1): raise schedule.PlanError('--lr: refused by check_plan')
    monkeypatch.setattr(schedule, 'check_plan', refuse)
    with pytest.raises(UsageError, match='refused by check_plan'):
        check_settings(train_parser().parse_args(['--dataset-path', 'synthetic']), 'train')

CHECK_FIRST = '''
import sys
from codseg.cli import main
rc = main({argv!r})
heavy = sorted(m for m in ('torch', 'timm', 'cv2', 'albumentations') if m in sys.modules)
print('RC', rc, 'HEAVY', heavy, file=sys.stderr)
'''

@pytest.mark.parametrize('cmd', ['train', 'lr-preview', 'find-lr', 'evaluate', 'predict'])
def test_bad_setting_refused_before_any_heavy_import(cmd, tmp_path):
    "A bad setting is refused (exit 2) before the command's module (torch, timm, OpenCV) is imported."
    argv = [cmd, *map(str, BAD[cmd][0])]
    r = subprocess.run([sys.executable, '-c', CHECK_FIRST.format(argv=argv)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert 'RC 2 HEAVY []' in r.stderr, r.stderr[-2000:]

def test_output_inside_an_input_through_a_symlink(tmp_path):
    "A dataset named through a symlink (as /kaggle/input mounts are), an output through its real path: refused."
    from codseg.cli import check_settings, UsageError
    from codseg.flags import train_parser
    real = tmp_path/'data'/'COD10K-v3'
    (real/'Train'/'Image').mkdir(parents=True)
    (real/'Train'/'GT_Object').mkdir()
    (tmp_path/'link').symlink_to(real)
    for ds, ck in ((tmp_path/'link', real/'ck'), (real, tmp_path/'link'/'ck')):
        ns = train_parser().parse_args(['--dataset-path', str(ds), '--checkpoint-dir', str(ck)])
        with pytest.raises(UsageError, match='is inside the input --dataset-path'):
            check_settings(ns, 'train')
    assert not (real/'ck').exists()

def test_unknown_flag_hint_only_for_unknown_flags():
    "A bad value of a known flag: exit 2, argparse's reason in one line, no 'did you mean' that flag itself."
    rc, out, err, _ = codseg('train', '--epochs', 'six')
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "invalid int value: 'six'" in err, err
    assert 'did you mean' not in err, err

def test_lr_preview_csv_and_png_rewritten(tmp_path):
    "lr-preview twice with the same --csv and --png: the second run rewrites them (a file there is no error)."
    for _ in range(2):
        rc, out, err, _ = codseg('lr-preview', '--train-size', 100, '--epochs', 4, '--stage1-epochs', 1,
                                 '--csv', tmp_path/'plan.csv', '--png', tmp_path/'plan.png')
        assert rc == 0 and f'wrote {tmp_path/"plan.csv"}' in out, err
