"A session ending: SIGTERM/SIGINT to the whole process group (DataLoader workers, torchrun) saves, exits 128+N, resumes."
import os, signal, subprocess, sys
import pytest
import torch

ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
RUN = ['--backbone', 'edgenext_xx_small', '--no-pretrained', '--img-size', 64, '--epochs', 2, '--stage1-epochs', 1,
       '--batch-size', 1, '--accumulation-steps', 2, '--num-experts', 3, '--ema']

def codseg(*args, launcher=()):
    r = subprocess.run([sys.executable, *launcher, '-m', 'codseg', *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('data')/'COD10K-v3'
    codseg('make-synthetic', d, '--n', 14, '--size', 64, '--seed', 3)
    return d

def stop_group(args, sig, launcher=()):
    "Start `codseg train ARGS` in its own process group; once epoch 2 is under way send `sig` to the whole group."
    p = subprocess.Popen([sys.executable, *launcher, '-m', 'codseg', 'train', *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith('  epoch 2: batch'): break
    else: raise AssertionError(''.join(seen))
    os.killpg(p.pid, sig)
    out = ''.join(seen) + p.stdout.read(); p.wait(timeout=120)
    return p.returncode, out

def weights(ck): return torch.load(ck/'last.pth', weights_only=True)

@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_group_signal_with_workers(data, tmp_path, sig):
    "Workers ignore the signal; the main process saves mid-epoch and exits 128+N; the resume equals a straight run."
    ck = tmp_path/'ck'
    args = ['--dataset-path', data, *RUN, '--num-workers', 2, '--checkpoint-dir', ck]
    rc, out = stop_group(args, sig)
    assert rc == 128 + sig and f'Stopped by {signal.Signals(sig).name} in epoch 2' in out, out
    assert 'killed by signal' not in out and 'Traceback' not in out, out
    c = weights(ck)
    assert c['epoch'] == 1 and c['batch'] > 0 and c['batch'] % 2 == 0
    r = codseg('train', *args, '--resume-from', 'auto')
    assert 'Epoch 2:' in r.stdout and 'Epoch 1:' not in r.stdout
    if sig != signal.SIGTERM: return
    codseg('train', *args[:-1], tmp_path/'straight', '--num-workers', 0)  # workers or not: the same numbers
    a, b = weights(tmp_path/'straight'), weights(ck)
    assert all(torch.equal(a[k][n], b[k][n]) for k in ('model', 'ema') for n in a[k])

def test_group_sigterm_under_torchrun(data, tmp_path):
    "Two processes (gloo): both stop at the same step; rank 0 saves mid-epoch; the run resumes under torchrun."
    ck = tmp_path/'ck'
    args = ['--dataset-path', data, *RUN, '--num-workers', 1, '--checkpoint-dir', ck]
    torchrun = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    rc, out = stop_group(args, signal.SIGTERM, torchrun)
    assert 'Stopped by SIGTERM in epoch 2' in out and 'killed by signal' not in out, out
    c = weights(ck)
    assert c['epoch'] == 1 and c['batch'] > 0 and c['plan']['world_size'] == 2
    r = codseg('train', *args, '--resume-from', 'auto', launcher=torchrun)
    assert 'Epoch 2:' in r.stdout and 'Epoch 1:' not in r.stdout
    print('torchrun exit status after the group SIGTERM:', rc)

def kernel_stream():
    "The Kaggle kernel's `stream`, from its training cell."
    import json, pathlib, shlex
    nb = json.loads((pathlib.Path(__file__).resolve().parents[1]/'kaggle'/'codseg-train.ipynb').read_text())
    cell = next(''.join(c['source']) for c in nb['cells'] if 'def stream' in ''.join(c['source']))
    ns = {'shlex': shlex, 'subprocess': subprocess, 'sys': sys}
    exec(cell.split('\nif world > 1:')[0], ns)
    return ns['stream']

@pytest.mark.parametrize('code, out, want', [('sys.exit(143)', '', 'signal'), ('sys.exit(130)', '', 'signal'),
                                             ('sys.exit(1)', 'Stopped by SIGTERM in epoch 3', 'signal'),
                                             ('sys.exit(0)', '', None), ('sys.exit(1)', 'Traceback', 'raise')])
def test_kernel_reads_a_stop_signal_as_the_session_end(code, out, want):
    "Exit 128+N (or torchrun's 1 after codseg's stop message) ends the session; the kernel goes on to evaluate."
    stream, cmd = kernel_stream(), [sys.executable, '-c', f'import sys; print({out!r}); {code}']
    if want == 'raise':
        with pytest.raises(RuntimeError, match='exit status 1'): stream(cmd)
    else: assert stream(cmd) == want
