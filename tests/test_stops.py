"""Held-out cases of issue 25 (nothing lost, nothing silent): each the exact case, the line a user reads and the exit
status. Checkpoints are two files; one run per checkpoint folder; every stop says why, what was saved and how to
resume; out of memory is one line; checkpoint formats are versioned."""
import hashlib, os, re, resource, shlex, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch

ENV = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
TINY = ['--dataset-path', 'synthetic', '--synthetic-n', '24', '--synthetic-size', '64', '--img-size', '64',
        '--backbone', 'edgenext_xx_small', '--no-pretrained', '--num-experts', '3', '--num-workers', '0',
        '--device', 'cpu', '--batch-size', '8', '--stage1-epochs', '1']

def codseg(*args, timeout=300):
    "`python -m codseg ARGS`: (status, stdout + stderr)."
    r = subprocess.run([sys.executable, '-m', 'codseg', *map(str, args)], capture_output=True, text=True, env=ENV,
                       timeout=timeout)
    return r.returncode, r.stdout + r.stderr

def start(*args):
    return subprocess.Popen([sys.executable, '-m', 'codseg', *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)

def wait_for(path: Path, timeout=120):
    t = time.time()
    while not path.exists():
        assert time.time() - t < timeout, f'{path} never appeared'
        time.sleep(0.1)

def digest(p: Path) -> str: return hashlib.sha1(p.read_bytes()).hexdigest()

def last_line(out: str) -> str: return [l for l in out.splitlines() if l.strip()][-1]

def test_last_and_best_are_two_files_so_overwriting_last_keeps_best(tmp_path):
    "A one-epoch run (its last epoch is its best): cp over last.pth and torch.save over it leave best_model.pth."
    ck = tmp_path/'ck'
    rc, out = codseg('train', *TINY, '--epochs', 1, '--checkpoint-dir', ck)
    assert rc == 0, out[-2000:]
    best = digest(ck/'best_model.pth')
    assert best == digest(ck/'last.pth') and not os.path.samefile(ck/'last.pth', ck/'best_model.pth')
    subprocess.run(['cp', str(ck/'config.json'), str(ck/'last.pth')], check=True)  # cp writes into the file
    assert digest(ck/'best_model.pth') == best
    torch.save({'model': {}}, ck/'last.pth')  # stripping the optimizer before an upload: torch.save in place
    assert digest(ck/'best_model.pth') == best

def test_one_run_per_checkpoint_folder(tmp_path):
    "A second run on a live run's folder is refused in one line naming it (exit 2); the live run is unharmed."
    ck = tmp_path/'ck'
    first = start('train', *TINY, '--epochs', 40, '--checkpoint-dir', ck)
    try:
        wait_for(ck/'last.pth')
        for extra in (['--resume-from', 'auto'], []):
            rc, out = codseg('train', *TINY, '--epochs', 40, '--checkpoint-dir', ck, *extra)
            assert rc == 2 and f'--checkpoint-dir {ck} is in use by a running codseg train (pid {first.pid} on ' in out, out
            assert 'Traceback' not in out and len(out.strip().splitlines()) == 1, out
        assert first.poll() is None  # still training: its .generations were left alone
        os.killpg(first.pid, signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
        assert first.returncode == 143 and 'Stopped by SIGTERM' in out, out[-2000:]
        assert torch.load(ck/'last.pth', weights_only=True)['epoch'] >= 1
    finally:
        if first.poll() is None: os.killpg(first.pid, signal.SIGKILL)

def test_a_dead_runs_lock_is_taken_over_with_a_note(tmp_path):
    ck = tmp_path/'ck'
    first = start('train', *TINY, '--epochs', 3, '--checkpoint-dir', ck)
    wait_for(ck/'last.pth')
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    rc, out = codseg('train', *TINY, '--epochs', 3, '--checkpoint-dir', ck, '--resume-from', 'auto')
    assert rc == 0 and f'took over {ck}/.codseg.lock from a run that is no longer running (pid {first.pid} on ' in out, out

def resume_command(line: str) -> list:
    "The command a stop line says resumes the run."
    assert 'resume with: codseg train ' in line, line
    return shlex.split(line.split('resume with: ')[1])[2:]  # the flags after `codseg train`

def test_stop_after_and_time_limit_say_why_what_and_how_to_resume(tmp_path):
    "--stop-after and --time-limit end with one line (reason, epoch, the file, the command) and exit 3."
    ck = tmp_path/'ck'
    rc, out = codseg('train', *TINY, '--epochs', 3, '--checkpoint-dir', ck, '--stop-after', 1)
    line = last_line(out)
    assert rc == 3 and line.startswith(f'Stopped by --stop-after 1 after epoch 1: {ck}/last.pth holds it'), out[-2000:]
    flags = resume_command(line)
    assert '--resume-from' in flags and flags[flags.index('--resume-from') + 1] == 'auto'
    rc, out = codseg('train', *flags)  # the printed command, as printed: the same settings, --stop-after 1 too
    assert rc == 3 and last_line(out).startswith('Stopped by --stop-after 1 after epoch 2: '), out[-2000:]
    rc, out = codseg('train', *resume_command(last_line(out)))
    assert rc == 0 and 'Epoch 3:' in out and 'Done: best IoU' in out, out[-2000:]
    rc, out = codseg('train', *TINY, '--epochs', 3, '--checkpoint-dir', tmp_path/'t', '--time-limit', 0.0001)
    assert rc == 3 and last_line(out).startswith('Stopped by --time-limit 0.0001 h (another epoch would end past '
                                                 'it) after epoch 1: '), out[-2000:]

def signalled(tmp_path, *signals, gap=0.5):
    "A run sent `signals` once its first checkpoint exists: (status, output, seconds from the first signal)."
    ck = tmp_path/'ck'
    p = start('train', *TINY, '--synthetic-n', 120, '--epochs', 30, '--checkpoint-dir', ck)  # ~14 batches an epoch
    try:
        wait_for(ck/'last.pth')
        time.sleep(1)  # into epoch 2
        t = time.time()
        for s in signals:
            os.killpg(p.pid, s)
            time.sleep(gap)
        out, _ = p.communicate(timeout=120)
        return p.returncode, out, time.time() - t
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)

def test_sighup_saves_and_says_so(tmp_path):
    "A closed terminal (SIGHUP to the process group): a resumable save, the stop line, exit 129."
    rc, out, _ = signalled(tmp_path, signal.SIGHUP)
    line = last_line(out)
    m = re.match(r'Stopped by SIGHUP (in epoch \d+ after batch \d+|in epoch \d+ before its validation|after epoch '
                 r'\d+): .*/last.pth holds it; resume with: codseg train ', line)
    assert rc == 129 and m and '--resume-from auto' in line and 'Traceback' not in out, out[-2000:]
    c = torch.load(tmp_path/'ck'/'last.pth', weights_only=True)
    assert (c['batch'] > 0) == ('after batch' in line)  # mid-epoch, as the line says

def test_a_second_ctrl_c_ends_at_once_without_a_traceback(tmp_path):
    rc, out, s = signalled(tmp_path, signal.SIGINT, signal.SIGINT, gap=0.05)
    assert rc == 130 and 'Traceback' not in out and s < 15, (s, out[-2000:])
    assert 'codseg: a second Ctrl-C: ended at once (last.pth holds the last save)' in out, out[-2000:]

def test_out_of_memory_on_the_cpu_is_one_line_and_the_checkpoint_is_intact(tmp_path):
    "Resumed at a size that does not fit the memory limit: one line with the size and the flags, exit 1."
    ck = tmp_path/'ck'
    rc, out = codseg('train', *TINY, '--epochs', 3, '--checkpoint-dir', ck, '--stop-after', 1)
    assert rc == 3, out[-2000:]
    before = digest(ck/'last.pth')
    code = ('import re, resource, sys\nimport torch, timm, cv2\nfrom codseg.cli import main\n'
            "vm = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
            'resource.setrlimit(resource.RLIMIT_AS, (vm + 1536 * 2**20,) * 2)\n'
            'sys.exit(main(sys.argv[1:]))')
    args = ['train', *TINY, '--epochs', 3, '--checkpoint-dir', ck, '--resume-from', 'auto', '--img-size', 1024,
            '--batch-size', 16, '--stage2-batch-size', 16]
    r = subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True, env=ENV,
                       timeout=300)
    line = last_line(r.stdout + r.stderr)
    assert r.returncode == 1 and line.startswith('codseg train: out of memory in host memory'), r.stdout + r.stderr
    assert '--img-size' in line and '--grad-checkpointing' in line and 'Traceback' not in r.stderr, line
    assert digest(ck/'last.pth') == before and not (ck/'last.pth').is_symlink()  # intact, a plain file

def test_a_cuda_out_of_memory_is_one_line_and_the_checkpoint_is_intact(tmp_path, private_cache):
    "torch.OutOfMemoryError as CUDA raises it, in epoch 2: describe's line; last.pth holds epoch 1, as a file."
    from codseg.config import Config
    from codseg.errors import describe
    from codseg.learner import Callback
    from codseg.train import train
    class CudaOOM(Callback):
        def before_batch(self, learn):
            if learn.epoch == 1: raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 '
                                                              'has a total capacity of 14.74 GiB')
    cfg = Config(dataset_path='synthetic', synthetic_n=24, synthetic_size=64, img_size=64, backbone='edgenext_xx_small',
                 pretrained=False, num_experts=3, num_workers=0, device='cpu', batch_size=8, epochs=3,
                 stage1_epochs=1, checkpoint_dir=str(tmp_path/'ck'))
    with pytest.raises(torch.OutOfMemoryError) as e: train(cfg, callbacks=[CudaOOM()], say=lambda *a: None)
    m, rc = describe(e.value)
    assert rc == 1 and m.startswith('out of memory on the GPU allocating 1.50 GiB: lower --img-size'), m
    c = torch.load(tmp_path/'ck'/'last.pth', weights_only=True)
    assert c['epoch'] == 1 and not (tmp_path/'ck'/'last.pth').is_symlink()

def test_checkpoint_formats(tmp_path, ckpt):
    "An older layout (no plan: once `KeyError: 'plan'`) resumes its weights with a note; a newer one is refused."
    c = torch.load(ckpt, weights_only=True)
    old = {k: v for k, v in c.items() if k not in ('plan', 'format')}
    torch.save(old, tmp_path/'old.pth')
    rc, out = codseg('train', *TINY, '--epochs', 1, '--checkpoint-dir', tmp_path/'a', '--resume-from',
                     tmp_path/'old.pth')
    assert rc == 0 and 'an older checkpoint layout' in out and 'without plan' in out, out[-2000:]
    torch.save({**c, 'format': 99, 'codseg': '9.9.9'}, tmp_path/'new.pth')
    rc, out = codseg('train', *TINY, '--epochs', 1, '--checkpoint-dir', tmp_path/'b', '--resume-from',
                     tmp_path/'new.pth')
    assert rc == 2 and 'was written by codseg 9.9.9 in checkpoint format 99' in out and 'upgrade codseg' in out, out
    assert len(out.strip().splitlines()) == 1, out

def children(pid) -> list[int]:
    "The processes whose parent is `pid` (from /proc)."
    out = []
    for p in Path('/proc').iterdir():
        if p.name.isdigit():
            try: stat = (p/'stat').read_text()
            except OSError: continue
            if int(stat.rsplit(')', 1)[1].split()[1]) == pid: out.append(int(p.name))
    return out

def running(pid) -> bool:
    "Whether process `pid` runs (a zombie waiting to be reaped has ended)."
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError: return False

def test_a_stopped_evaluate_leaves_no_dataloader_workers(tmp_path, ckpt):
    "SIGTERM (or SIGKILL) to `codseg evaluate` alone: its DataLoader workers end with it, never orphaned."
    data = tmp_path/'data'
    assert codseg('make-synthetic', data, '--n', 240, '--size', 96)[0] == 0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = start('evaluate', '--checkpoint', ckpt, '--dataset-path', data, '--num-workers', 2, '--img-size', 384,
                  '--tta', '--output', tmp_path/f'out{sig}', '--device', 'cpu')
        t = time.time()
        while len(workers := children(p.pid)) < 2:
            assert p.poll() is None and time.time() - t < 120, 'no workers started'
            time.sleep(0.1)
        os.kill(p.pid, sig)  # the main process alone, not its group
        p.communicate(timeout=60)
        t = time.time()
        while any(map(running, workers)) and time.time() - t < 15: time.sleep(0.1)
        left = [w for w in workers if running(w)]
        for w in left:
            try: os.kill(w, signal.SIGKILL)
            except ProcessLookupError: pass
        assert not left, f'{signal.Signals(sig).name}: workers left behind: {left}'
