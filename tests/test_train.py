"End to end: `codseg train` as a user runs it — the guide's scenarios, resume, kills, divergence, learning."
import csv, hashlib, math, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch

GUIDE = Path(__file__).resolve().parents[1]/'docs'/'lr-scheduler-guide.md'
EPOCH = re.compile(r'^Epoch (\d+): Loss: ([\d.]+|nan|inf) \| IoU: ([\d.]+) \| Dice: ([\d.]+) \| LR: ([\d.]+(?:e-\d+)?)', re.M)

def codseg(*args, check=True, **kw):
    "Run `python -m codseg ARGS`, returning the completed process (status 0, or 3 for a stop by --stop-after)."
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    r = subprocess.run([sys.executable, '-m', 'codseg', *map(str, args)], capture_output=True, text=True, env=env, **kw)
    ok = (0, 3) if '--stop-after' in args else (0,)
    if check: assert r.returncode in ok, f'codseg {args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A small synthetic dataset in the COD10K-v3 layout, written by `codseg make-synthetic`."
    d = tmp_path_factory.mktemp('data')/'COD10K-v3'
    codseg('make-synthetic', d, '--n', 14, '--size', 96, '--seed', 3)
    return d

def guide_commands():
    "The guide's four scenario commands, as lists of arguments after `train`."
    text = GUIDE.read_text()
    blocks = re.findall(r'```bash\n(python train_ultimate.py train.*?)```', text, re.S)
    cmds = [b.replace('\\\n', ' ').split()[3:] for b in blocks if '--dataset-path' in b]
    assert len(cmds) == 4
    return cmds

def adapt(cmd, data, ckdir, resume=None, epochs=None, stage1=None):
    "The guide's command with only paths and sizes changed, as the issue allows."
    out, it = [], iter(cmd)
    swap = {'--dataset-path': data, '--checkpoint-dir': ckdir, '--resume-from': resume, '--backbone': 'edgenext_xx_small',
            '--img-size': 96, '--epochs': epochs, '--stage1-epochs': stage1, '--num-workers': 0}
    for a in it:
        out.append(a)
        if a in swap: next(it); out.append(swap[a])
    return out + ['--no-pretrained']

def epoch_lrs(stdout):
    "{epoch number: printed LR} from the epoch lines."
    return {int(m[0]): float(m[4]) for m in EPOCH.findall(stdout)}

def preview_lrs(args, tmp, resume=None):
    "{epoch number: decoder LR at the epoch's last step} from `codseg lr-preview --csv` with the same flags."
    f = tmp/f'plan{time.time_ns()}.csv'
    codseg('lr-preview', *args, *(['--resume-from', resume] if resume else []), '--csv', f)
    last = {}
    for r in csv.DictReader(open(f)): last[math.floor(float(r['epoch']) + 1e-9) + 1] = float(r['lr'])
    return last

def test_guide_scenarios(data, tmp_path):
    s1, s2, s3, s4 = guide_commands()
    ck = tmp_path/'checkpoints'
    # Stage 2 keeps room for the guide's warmups (3 and 5 epochs); the resumes extend the first run
    runs = [(adapt(s1, data, ck, epochs=5, stage1=1), None),
            (adapt(s2, data, ck, resume=ck/'best_model.pth', epochs=7, stage1=1), ck/'best_model.pth'),
            (adapt(s3, data, tmp_path/'optimal', epochs=8, stage1=1), None),
            (adapt(s4, data, ck, resume=ck/'best_model.pth', epochs=8, stage1=1), ck/'best_model.pth')]
    for args, resume in runs:
        expect = preview_lrs(args, tmp_path, resume)  # before training: the plan the run will follow
        r = codseg('train', *args)
        got = epoch_lrs(r.stdout)
        assert got, r.stdout
        for e, lr in got.items(): assert lr == pytest.approx(expect[e], abs=5e-7), (e, lr, expect[e])
        if resume: assert 'Plan settings changed' in r.stdout

def test_resume_is_exact(data, tmp_path):
    common = ['--dataset-path', data, '--backbone', 'edgenext_xx_small', '--no-pretrained', '--img-size', 64,
              '--epochs', 4, '--stage1-epochs', 2, '--batch-size', 4, '--accumulation-steps', 2, '--num-workers', 0,
              '--num-experts', 3, '--ema']
    codseg('train', *common, '--checkpoint-dir', tmp_path/'straight')
    codseg('train', *common, '--checkpoint-dir', tmp_path/'split', '--stop-after', 2)
    r = codseg('train', *common, '--checkpoint-dir', tmp_path/'split', '--resume-from', 'auto')
    assert 'identical curve' in r.stdout and sorted(epoch_lrs(r.stdout)) == [3, 4]
    a, b = (torch.load(tmp_path/d/'last.pth', weights_only=True) for d in ('straight', 'split'))
    for k in ('model', 'ema'): assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
    assert [h['loss'] for h in a['history']] == [h['loss'] for h in b['history']]

INTERRUPTED = ['--backbone', 'edgenext_xx_small', '--no-pretrained', '--img-size', 64, '--epochs', 3, '--stage1-epochs', 1,
               '--batch-size', 1, '--accumulation-steps', 2, '--num-workers', 0, '--num-experts', 3, '--ema']

@pytest.fixture(scope='module')
def straight(data, tmp_path_factory):
    "last.pth of the uninterrupted run the interrupted ones must equal."
    ck = tmp_path_factory.mktemp('straight')
    codseg('train', '--dataset-path', data, *INTERRUPTED, '--checkpoint-dir', ck)
    return torch.load(ck/'last.pth', weights_only=True)

def start(args, **kw):
    "Start `codseg train ARGS`; return the process once its second epoch is under way (a progress line of it)."
    p = subprocess.Popen([sys.executable, '-m', 'codseg', 'train', *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'}, **kw)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith('  epoch 2: batch'): return p, seen
    raise AssertionError(''.join(seen))

def same_run(a, b):
    "Whether two final checkpoints hold the same weights, EMA weights and per-epoch losses."
    return (all(torch.equal(a[k][n], b[k][n]) for k in ('model', 'ema') for n in a[k])
            and [h['loss'] for h in a['history']] == [h['loss'] for h in b['history']])

def test_sigkill_then_resume(data, straight, tmp_path):
    ck = tmp_path/'ck'
    args = ['--dataset-path', data, *INTERRUPTED, '--checkpoint-dir', ck]
    p, _ = start(args)
    p.send_signal(signal.SIGKILL); p.wait()
    assert torch.load(ck/'last.pth', weights_only=True)['epoch'] == 1
    r = codseg('train', *args, '--resume-from', 'auto')
    assert sorted(epoch_lrs(r.stdout)) == [2, 3]
    assert not [f for f in os.listdir(ck) if '.tmp' in f]
    assert same_run(straight, torch.load(ck/'last.pth', weights_only=True))

def test_stop_signal_saves_mid_epoch(data, straight, tmp_path):
    ck = tmp_path/'ck'
    args = ['--dataset-path', data, *INTERRUPTED, '--checkpoint-dir', ck]
    p, seen = start(args)
    p.send_signal(signal.SIGTERM)
    out = ''.join(seen) + p.stdout.read(); p.wait()
    assert p.returncode == 128 + signal.SIGTERM and 'Stopped by SIGTERM in epoch 2' in out, out
    c = torch.load(ck/'last.pth', weights_only=True)
    assert c['epoch'] == 1 and c['batch'] > 0 and c['batch'] % 2 == 0
    r = codseg('train', *args, '--resume-from', 'auto')
    assert sorted(epoch_lrs(r.stdout)) == [2, 3]
    assert same_run(straight, torch.load(ck/'last.pth', weights_only=True))

def sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()

def test_divergence_keeps_checkpoints(data, tmp_path):
    ck = tmp_path/'ck'
    args = ['--dataset-path', data, '--backbone', 'edgenext_xx_small', '--no-pretrained', '--img-size', 64,
            '--stage1-epochs', 1, '--batch-size', 4, '--accumulation-steps', 1, '--num-workers', 0, '--num-experts', 3,
            '--checkpoint-dir', ck, '--scheduler', 'none', '--stage1-scheduler', 'none']
    codseg('train', *args, '--epochs', 2)
    before = {f: sha(ck/f) for f in ('last.pth', 'best_model.pth')}
    r = codseg('train', *args, '--epochs', 4, '--resume-from', 'auto', '--lr', 1000, '--grad-clip', 0, check=False)
    assert r.returncode == 1 and 'reduce --stage2-lr' in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert {f: sha(ck/f) for f in before} == before

def small_run(data, ck):
    "Flags of a 2-epoch run at 64 px with 3 experts, ending with --checkpoint-dir `ck`."
    return ['--dataset-path', data, '--backbone', 'edgenext_xx_small', '--no-pretrained', '--img-size', 64,
            '--epochs', 2, '--stage1-epochs', 1, '--num-workers', 0, '--num-experts', 3, '--checkpoint-dir', ck]

def test_refuses_other_architecture(data, tmp_path):
    ck = tmp_path/'ck'
    args = small_run(data, ck)
    codseg('train', *args, '--stop-after', 1)
    r = codseg('train', *args[:-4], '--num-experts', 4, '--checkpoint-dir', ck, '--resume-from', 'auto', check=False)
    assert r.returncode == 1 and '--num-experts 3' in r.stderr and '--num-experts 4' in r.stderr

def test_refuses_weights_of_another_model(data, tmp_path):
    "A checkpoint whose weights do not fit (same flags, a model laid out differently) is refused; nothing is written."
    ck = tmp_path/'ck'
    args = small_run(data, ck)
    codseg('train', *args, '--stop-after', 1)
    state = torch.load(ck/'last.pth', weights_only=True)
    view = state['model'].pop('moe.experts.view')  # as an earlier codseg wrote its experts: one conv per expert
    state['model'].update({f'moe.experts.views.{e}.weight': v[:, None] for e, v in enumerate(view)})
    torch.save(state, ck/'last.pth')
    before = {p.relative_to(ck): p.read_bytes() for p in ck.rglob('*') if p.is_file()}  # panels in predictions/ too
    r = codseg('train', *args, '--resume-from', 'auto', check=False)
    assert r.returncode == 1 and 'do not fit this model' in r.stderr and 'earlier codseg version' in r.stderr, r.stderr
    assert {p.relative_to(ck): p.read_bytes() for p in ck.rglob('*') if p.is_file()} == before

def test_dry_run_writes_nothing(data, tmp_path):
    r = codseg('train', '--dataset-path', data, '--checkpoint-dir', tmp_path/'ck', '--dry-run', '--no-pretrained',
               '--backbone', 'edgenext_xx_small')
    assert 'LR plan' in r.stdout and '"scheduler": "onecycle"' in r.stdout and not (tmp_path/'ck').exists()

def test_synthetic_is_learned(tmp_path):
    "The README's first command: edgenext_xx_small at 128 px, 6 epochs on CPU, IoU at least 0.3 above epoch 1's."
    readme = (Path(__file__).resolve().parents[1]/'README.md').read_text()
    demo = re.search(r'<!-- ci:demo -->\n```bash\n(.*?)\n```', readme, re.S)[1]
    args = demo.split('codseg train ', 1)[1].split()
    args[args.index('--checkpoint-dir') + 1] = tmp_path/'demo'
    ious = [float(m[2]) for m in EPOCH.findall(codseg('train', *args).stdout)]
    assert len(ious) == 6 and ious[-1] - ious[0] >= 0.3, ious
