"""Every code block of README.md and kaggle/README.md that a user would run, run as written: shell blocks through the
CLI (a mock COD10K under a stand-in /kaggle, small settings), Python blocks in a Jupyter kernel (execnb); blocks that
need Kaggle, a GPU or an install are skipped with the reason."""
import os, re, shlex, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT/'README.md', ROOT/'kaggle'/'README.md']
SMALL = ['--synthetic-n', '32', '--synthetic-size', '64', '--num-workers', '0', '--device', 'cpu']

def blocks(path: Path) -> list:
    "(id, language, text, marker) of each fenced block in `path`; the marker is an HTML comment on the line above."
    text, out = path.read_text(), []
    for m in re.finditer(r'(?:<!-- (\S+) -->\n)?```(\w*)\n(.*?)```', text, re.S):
        line = text[:m.start(2)].count('\n') + 1
        out.append((f'{path.relative_to(ROOT)}:{line}', m.group(2), m.group(3), m.group(1)))
    return out

BLOCKS = [b for p in DOCS for b in blocks(p) if b[1] in ('bash', 'python')]

def commands(text: str) -> list:
    "The commands of a shell block: continuations joined, comments dropped, `&&` chains split; each as argv."
    argvs = []
    for line in text.replace('\\\n', ' ').splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index('&&') if '&&' in words else len(words)
            argvs.append(words[:cut]); words = words[cut + 1:]
    return argvs

def skip_reason(argv: list) -> str | None:
    "Why a command is not run here, or None."
    if argv[:2] == ['pip', 'install']: return 'installs codseg: these tests run in the installed tree'
    if any(a in ('nbdev_test', 'pytest') for a in argv) or argv[:3] == ['python', '-m', 'pytest']: return 'runs the test suite itself'
    if argv[:2] == ['python', 'kaggle/push.py'] and '--dry-run' not in argv: return 'needs Kaggle credentials and the network'
    if argv[0] in ('torchrun',): return 'needs GPUs'
    return None

@pytest.fixture(scope='module')
def stage(tmp_path_factory):
    "A working folder with a stand-in /kaggle: a small mock COD10K-v3 under input, and the working folder."
    d = tmp_path_factory.mktemp('readme')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CODSEG_CACHE': str(d/'cache')}
    ds = d/'kaggle'/'input'/'cod10k-dataset'/'COD10K-v3'
    subprocess.run([sys.executable, '-m', 'codseg', 'make-synthetic', str(ds), '--n', '24', '--size', '64'], check=True,
                   env=env, capture_output=True)
    (d/'kaggle'/'working'/'checkpoints').mkdir(parents=True)
    return d, env

def localise(argv: list, d: Path) -> list:
    "`argv` with /kaggle paths under the stand-in `d`/kaggle."
    return [a.replace('/kaggle/', f'{d}/kaggle/') for a in argv]

def resume_checkpoint(argv: list, d: Path):
    "A weights checkpoint of the architecture `argv` names where its --resume-from expects one (random weights)."
    import torch
    from codseg.flags import train_parser
    from codseg.config import from_args, to_dict
    from codseg.model import build_model
    cfg = from_args(train_parser().parse_args(argv))
    if cfg.resume_from in (None, 'auto') or Path(cfg.resume_from).is_file(): return
    p = Path(cfg.resume_from)
    p.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(__import__('dataclasses').replace(cfg, pretrained=False))
    torch.save({'model': model.state_dict(), 'config': to_dict(cfg)}, p)

def evaluate_inputs(argv: list, d: Path):
    """What an `evaluate` command names, where it expects it: a small checkpoint at each --checkpoint, and released
    maps (the staged test masks, blurred) in each --pred-dir folder, one subfolder per test set."""
    import cv2, torch
    from codseg.config import Config, to_dict
    from codseg.model import build_model
    from codseg.maps import parse_pred_dir
    ns = __import__('codseg.flags', fromlist=['x']).evaluate_parser().parse_args(argv)
    cfg = Config(backbone='edgenext_xx_small', num_experts=3, pretrained=False, img_size=64, num_workers=0)
    for c in ns.checkpoint or []:
        if not Path(c).is_file():
            Path(c).parent.mkdir(parents=True, exist_ok=True)
            torch.save({'model': build_model(cfg).state_dict(), 'config': to_dict(cfg)}, c)
    gts = sorted(Path(ns.dataset_path).glob('Test/GT_Object/*.png'))
    for _, folder, _ in map(parse_pred_dir, ns.pred_dir or []):
        (Path(folder)/'COD10K').mkdir(parents=True, exist_ok=True)
        for g in gts: cv2.imwrite(str(Path(folder)/'COD10K'/g.name), cv2.GaussianBlur(cv2.imread(str(g), 0), (9, 9), 3))

def run(argv, env, cwd, timeout=300):
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    return r.returncode, r.stdout + r.stderr

def small_demo(argv: list) -> list:
    "The README's demo with small settings: 2 epochs of 32 images of 64 px."
    a = list(argv)
    for flag, v in (('--img-size', '64'), ('--epochs', '2'), ('--num-workers', '0')): a[a.index(flag) + 1] = v
    return a + SMALL[:4] + ['--device', 'cpu']

@pytest.mark.parametrize('block', [b for b in BLOCKS if b[1] == 'bash'], ids=lambda b: b[0])
def test_shell_block(block, stage, capsys):
    "Each command runs and exits 0 (train: a --dry-run, except the demo, which runs small, twice: 'already complete')."
    where, _, text, marker = block
    d, env = stage
    ran = 0
    for argv in commands(text):
        if why := skip_reason(argv):
            with capsys.disabled(): print(f'\n{where}: skipped `{" ".join(argv[:3])} ...`: {why}')
            continue
        if argv[0] == 'python': argv = [sys.executable] + argv[1:]
        elif argv[0] == 'codseg': argv = [sys.executable, '-m', 'codseg'] + argv[1:]
        argv = localise(argv, d)
        if argv[3:4] == ['train'] and marker == 'ci:demo':
            argv = small_demo(argv)
            rc, out = run(argv, env, d)
            assert rc == 0 and 'Done: best IoU' in out, out[-3000:]
            rc, out = run(argv, env, d)  # the same command again: nothing left to do is success, not failure
            assert rc == 0 and 'already complete' in out and 'Traceback' not in out, out[-3000:]
        else:
            if argv[3:4] == ['train']:
                resume_checkpoint(argv[4:], d)
                argv = argv + ['--dry-run', '--num-workers', '0', '--device', 'cpu']
            if argv[3:4] == ['evaluate']:
                evaluate_inputs(argv[4:], d)
                argv = argv + ['--num-workers', '0', '--device', 'cpu']
            rc, out = run(argv, env, ROOT if 'kaggle/push.py' in argv[1:2] else d)
            assert rc == 0 and 'Traceback' not in out, f'{where}: {shlex.join(argv)}\n{out[-3000:]}'
        ran += 1
    if not ran: pytest.skip(f'{where}: nothing runnable here (see the reasons printed)')

SETUP = '''
import os, codseg.train as T
os.chdir({cwd!r}); os.environ['CODSEG_CACHE'] = {cache!r}
_train = T.train
def _small(cfg=None, *a, **kw):  # the block's own call, with small data on the CPU
    return _train(cfg, *a, **{{**kw, 'synthetic_n': 32, 'synthetic_size': 64, 'img_size': 64, 'num_workers': 0, 'device': 'cpu'}})
T.train = _small
'''

@pytest.mark.parametrize('block', [b for b in BLOCKS if b[1] == 'python'], ids=lambda b: b[0])
def test_python_block(block, stage):
    "Each Python block runs in a Jupyter kernel (execnb) without an error (train with small data on the CPU)."
    from execnb.shell import CaptureShell
    import codseg.train as T
    where, _, text, _ = block
    d, env = stage
    # the kernel runs in this process: its stand-in train and its cache folder are undone after
    sh, train, cache = CaptureShell(), T.train, os.environ.get('CODSEG_CACHE')
    try:
        sh.run(SETUP.format(cwd=str(d/'nb'), cache=env['CODSEG_CACHE']).replace("os.chdir(", "os.makedirs({0!r}, exist_ok=True); os.chdir(".format(str(d/'nb'))))
        assert not sh.exc, sh.exc
        sh.run(text)
        assert not sh.exc, f'{where}: {sh.exc!r}'
    finally:
        os.chdir(ROOT)
        T.train = train  # later tests in this process (train_cli included) get the real one
        if cache is None: os.environ.pop('CODSEG_CACHE', None)
        else: os.environ['CODSEG_CACHE'] = cache
