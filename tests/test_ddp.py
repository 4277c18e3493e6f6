"""Several processes on CPU (gloo over 127.0.0.1) through torchrun: one model on every route, equal to one process
with the same global batch; no process waits alone; processes agree or stop in one line; restarts resume; stop
signals save and end every process; two c10d agents (2 nodes x 1 process).

Every launch runs in its own session with a timeout; a hang kills it whole, with the workers whose pids the
driver (tests/ddp_driver.py) recorded, and fails the test."""
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path
import pytest, torch
from codseg.train import validate

HERE = Path(__file__).parent
ENV = {'OMP_NUM_THREADS': '1', 'GLOO_SOCKET_IFNAME': 'lo', 'PYTHONUNBUFFERED': '1', 'MASTER_ADDR': '127.0.0.1',
       'TORCHELASTIC_RESTART_COUNT': ''}
BASE = dict(dataset_path='synthetic', synthetic_n=36, synthetic_size=64, img_size=64, backbone='edgenext_xx_small',
            pretrained=False, num_experts=3, num_workers=0, device='cpu', lr=2e-3, scheduler='cosine',
            accumulation_steps=1, epochs=4, stage1_epochs=1)  # 32 training images: 4 steps of 8 per epoch

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def torchrun(*args, nproc=2, nnodes=1, port=None, env=None):
    "The torchrun command line for `args` on 127.0.0.1 (c10d rendezvous)."
    return [sys.executable, '-m', 'torch.distributed.run', '--nnodes', str(nnodes), '--nproc-per-node', str(nproc),
            '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port or free_port()}', '--rdzv-id', 'codseg-test',
            *map(str, args)]

def start(cmd, env=None):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ENV, **(env or {})}, start_new_session=True)

def finish(p, timeout=240, pids=None):
    "(status, output) of `p`; after `timeout` s it is killed whole (and the pids in file `pids`) and the test fails."
    try: out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        for pid in worker_pids(pids): kill(pid)
        out, _ = p.communicate()
        raise AssertionError(f'hung: killed after {timeout}s\n{out[-4000:]}') from None
    return p.returncode, out

def run(cmd, env=None, timeout=240, pids=None): return finish(start(cmd, env), timeout, pids)

def kill(pid):
    try: os.kill(pid, signal.SIGKILL)
    except ProcessLookupError: pass

def worker_pids(path) -> list[int]:
    return [int(l) for l in Path(path).read_text().split()] if path and Path(path).exists() else []

def alive(pid) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    try: return Path(f'/proc/{pid}/stat').read_text().split()[2] != 'Z'  # a zombie has ended
    except OSError: return False

def assert_no_orphans(pids, within=20):
    "Every worker whose pid the driver recorded has ended within `within` s."
    t = time.time()
    while any(alive(p) for p in worker_pids(pids)) and time.time() - t < within: time.sleep(0.2)
    left = [p for p in worker_pids(pids) if alive(p)]
    for p in left: kill(p)
    assert not left, f'processes left behind: {left}'

def rows_of(out) -> list[dict]:
    return [json.loads(l) for l in Path(out).read_text().splitlines()] if Path(out).exists() else []

def drive(out, routes, nproc=2, env=None, timeout=240):
    "Run tests/ddp_driver.py's `routes` (under torchrun when `nproc` > 1); (status, output, rows of `out`)."
    args = [HERE/'ddp_driver.py', out, json.dumps(routes)]
    cmd = torchrun(*args, nproc=nproc) if nproc > 1 else [sys.executable, *map(str, args)]
    rc, log = run(cmd, env, timeout, pids=f'{out}.pids')
    return rc, log, rows_of(out)

def restarted(out, routes, count=1, timeout=240):
    """The driver's `routes` in 2 processes as torchrun starts them after `count` restarts (its environment, with
    TORCHELASTIC_RESTART_COUNT set: torchrun's own restart is flaky with gloo on this torch); (statuses, output)."""
    env = {'MASTER_PORT': str(free_port()), 'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2',
           'TORCHELASTIC_RUN_ID': 'codseg-test', 'TORCHELASTIC_RESTART_COUNT': str(count)}
    cmd = [sys.executable, str(HERE/'ddp_driver.py'), out, json.dumps(routes)]
    ps = [start(cmd, {**env, 'RANK': str(r), 'LOCAL_RANK': str(r)}) for r in range(2)]
    done = [finish(p, timeout, pids=f'{out}.pids') for p in ps]
    return [rc for rc, _ in done], ''.join(log for _, log in done)

def routes(d, bs):
    "The matrix: each route a list of sessions of `BASE` with `bs` images per process."
    b = dict(BASE, batch_size=bs)
    ck = lambda name, **kw: dict(b, checkpoint_dir=f'{d}/{name}', **kw)
    return {
        # fresh; resumed in Stage 2 (without --progressive-unfreeze) and re-planned; stopped mid-epoch; resumed
        'replan': [ck('replan', stop_after=2),
                   ck('replan', resume_from='auto', stage2_lr=3e-3, signal_at=['SIGTERM', 9]),
                   ck('replan', resume_from='auto', stage2_lr=3e-3)],
        'skip': [ck('skip', skip_stage1=True, ema=True)],  # the first epoch in Stage 2
        'progressive': [ck('progressive', progressive_unfreeze=True, epochs=5, stage1_epochs=2, stop_after=1),
                        ck('progressive', progressive_unfreeze=True, epochs=5, stage1_epochs=2, resume_from='auto')],
        'straight': [ck('straight', epochs=3)]}  # the reference of the restart test

EPOCHS = {'replan': [1, 2, 3, 4], 'skip': [2, 3, 4], 'progressive': [1, 2, 3, 4, 5], 'straight': [1, 2, 3]}

@pytest.fixture(scope='module')
def matrix(tmp_path_factory):
    "Every route with 2 processes x 4 images, and with 1 process x 8."
    two, one = tmp_path_factory.mktemp('two'), tmp_path_factory.mktemp('one')
    rc2, log2, rows2 = drive(str(two/'rows.jsonl'), routes(two, 4))
    assert rc2 == 0, log2[-4000:]
    rc1, log1, rows1 = drive(str(one/'rows.jsonl'), routes(one, 8), nproc=1)
    assert rc1 == 0, log1[-4000:]
    return two, one, rows2, log2

def weights(path, key='model'):
    return torch.load(path, weights_only=True)[key]

@pytest.mark.parametrize('route', list(EPOCHS))
def test_one_model_on_every_route(matrix, route):
    "After every epoch the 2 processes hold identical weights; the run equals 1 process with the same global batch."
    two, one, rows, log = matrix
    digests = [r for r in rows if r['route'] == route and 'digests' in r]
    assert [r['epoch'] for r in digests] == EPOCHS[route]
    assert all(len(r['digests']) == 2 and r['digests'][0] == r['digests'][1] for r in digests), digests
    a, b = torch.load(two/route/'last.pth', weights_only=True), torch.load(one/route/'last.pth', weights_only=True)
    assert a['plan']['world_size'] == 2 and b['plan']['world_size'] == 1
    for k in ('model', *(['ema'] if route == 'skip' else [])):
        diff = max((a[k][n].float() - b[k][n].float()).abs().max().item() for n in a[k])
        assert diff < 2e-4, (k, diff)  # float rounding (seen: ~1e-5); without DDP's sync it is ~1e-2
    for ha, hb in zip(a['history'], b['history'], strict=True):
        assert ha['epoch'] == hb['epoch'] and ha['loss'] == pytest.approx(hb['loss'], abs=1e-4)
        assert ha['iou'] == pytest.approx(hb['iou'], abs=1e-3)
    assert 'Grad strides do not match' not in log  # parameters and gradients share their memory format

def test_the_balance_loss_is_the_global_batchs(matrix):
    "With the MoE balance loss on (the default weight), the replanned route's losses match 1 x 8 to float rounding."
    two, one, _, _ = matrix
    la = [h['loss'] for h in torch.load(two/'replan'/'last.pth', weights_only=True)['history']]
    lb = [h['loss'] for h in torch.load(one/'replan'/'last.pth', weights_only=True)['history']]
    assert la == pytest.approx(lb, abs=1e-6)

def test_one_validation_item_two_processes_exact_metrics_and_resume_alone(tmp_path):
    "The README's torchrun line on 12 images (1 for validation: rank 1 has none) runs to its end; exact metrics."
    ck = tmp_path/'ck'
    args = ['--dataset-path', 'synthetic', '--synthetic-n', 12, '--synthetic-size', 64, '--img-size', 64,
            '--backbone', 'edgenext_xx_small', '--no-pretrained', '--num-experts', 3, '--num-workers', 0,
            '--batch-size', 3, '--stage2-batch-size', 2, '--accumulation-steps', 2, '--stage1-epochs', 1,
            '--epochs', 3, '--checkpoint-dir', ck, '--device', 'cpu']
    rc, log = run(torchrun('-m', 'codseg', 'train', *args, '--stop-after', 2), timeout=180)
    # a stop by --stop-after exits 3, which torchrun reports as a failure (1); one process prints
    assert rc == 1 and 'x2 processes' in log and log.count('Epoch 2:') == 1, log[-3000:]
    assert 'Stopped by --stop-after 2 after epoch 2' in log and 'exitcode  : 3' in log, log[-3000:]
    c = torch.load(ck/'last.pth', weights_only=True)
    assert [h['stage'] for h in c['history']] == [1, 2]
    m = validate(ck/'last.pth', device='cpu', num_workers=0)  # one process, the same weights
    assert (m['iou'], m['dice']) == pytest.approx((c['history'][-1]['iou'], c['history'][-1]['dice']), abs=1e-9)
    rc, log = run([sys.executable, '-m', 'codseg', 'train', *map(str, args), '--resume-from', 'auto'], timeout=180)
    assert rc == 0 and 'Epoch 3:' in log and 'processes 2 -> 1' in log, log[-3000:]

def test_processes_that_see_different_checkpoint_folders_stop_in_seconds(tmp_path):
    "Node-local checkpoint folders (a working folder per rank, a relative --checkpoint-dir): each stops in seconds."
    for r in (0, 1): (tmp_path/f'node{r}').mkdir()
    b = dict(BASE, batch_size=4, epochs=2, checkpoint_dir='ck', chdir=f'{tmp_path}/node{{rank}}')
    t = time.time()
    rc, log, _ = drive(str(tmp_path/'a.jsonl'), {'fresh': [b]}, timeout=120)
    assert rc != 0 and time.time() - t < 90, log[-3000:]
    assert 'processes disagree on --checkpoint-dir ck' in log and 'storage every node shares' in log, log[-3000:]
    torch.save({'epoch': 1}, tmp_path/'node0'/'ck'/'last.pth')  # rank 0's folder holds a checkpoint, rank 1's not
    t = time.time()
    rc, log, _ = drive(str(tmp_path/'b.jsonl'), {'resume': [dict(b, resume_from='auto')]}, timeout=120)
    assert rc != 0 and time.time() - t < 90 and 'disagree on the checkpoint to resume from' in log, log[-3000:]
    assert f'rank 1 (on {socket.gethostname()}) cannot read ck/last.pth' in log, log[-3000:]

def test_a_skewed_clock_does_not_split_the_time_limit(tmp_path):
    "Rank 1's clock runs 100x fast: rank 0's clock decides --time-limit for both; the run ends, no hang."
    b = dict(BASE, batch_size=4, epochs=3, time_limit=0.02, fast_clock_rank=1, checkpoint_dir=f'{tmp_path}/ck')
    rc, log, rows = drive(str(tmp_path/'rows.jsonl'), {'clock': [b]}, timeout=150)
    assert rc == 0 and rows[-1]['last_epoch'] == 3 and rows[-1]['stopped'] is None, log[-3000:]

def test_a_killed_rank_ends_the_run_and_a_restart_resumes_exactly(matrix, tmp_path):
    "Rank 1 SIGKILLed mid-epoch 3: every process ends; torchrun's restart (no --resume-from) equals the straight run."
    b = dict(BASE, batch_size=4, epochs=3, checkpoint_dir=f'{tmp_path}/ck')
    t = time.time()
    rc, log, _ = drive(str(tmp_path/'a.jsonl'), {'kill': [dict(b, kill_rank_at=[1, 9])]}, timeout=150)
    assert rc != 0 and time.time() - t < 120, log[-3000:]
    assert_no_orphans(tmp_path/'a.jsonl.pids')
    assert torch.load(tmp_path/'ck'/'last.pth', weights_only=True)['epoch'] == 2  # the last epoch saved
    rcs, log = restarted(str(tmp_path/'b.jsonl'), {'restart': [b]})  # the same command, restarted
    assert rcs == [0, 0] and 'torchrun restart 1: resuming from the newest last.pth' in log, log[-3000:]
    a, ref = weights(tmp_path/'ck'/'last.pth'), weights(matrix[0]/'straight'/'last.pth')
    assert all(torch.equal(a[n], ref[n]) for n in ref)  # bit for bit: the route is deterministic

def test_sigusr1_saves_mid_epoch_and_every_process_ends(tmp_path):
    "SLURM's warning (SIGUSR1) saves a resumable mid-epoch last.pth; each worker exits 138; torchrun returns 1."
    b = dict(BASE, batch_size=4, epochs=3, checkpoint_dir=f'{tmp_path}/ck', signal_at=['SIGUSR1', 6])
    rc, log, rows = drive(str(tmp_path/'rows.jsonl'), {'usr1': [b]}, timeout=150)
    assert rc == 1 and 'Stopped by SIGUSR1 in epoch 2 after batch 3' in log, log[-3000:]
    assert 'exitcode  : 138' in log or '(exitcode: 138)' in log, log[-3000:]
    c = torch.load(tmp_path/'ck'/'last.pth', weights_only=True)
    assert (c['epoch'], c['batch'], c['global_step']) == (1, 3, 7)
    assert_no_orphans(tmp_path/'rows.jsonl.pids')

def test_a_killed_agent_leaves_no_orphans(tmp_path):
    "torchrun's agent SIGKILLed mid-epoch: its workers get SIGTERM (PDEATHSIG), save, and end within seconds."
    b = dict(BASE, batch_size=4, epochs=3, checkpoint_dir=f'{tmp_path}/ck', agent_signal_at=['SIGKILL', 6])
    rc, log, _ = drive(str(tmp_path/'rows.jsonl'), {'agent': [b]}, timeout=150)
    assert rc == -signal.SIGKILL, log[-3000:]
    assert_no_orphans(tmp_path/'rows.jsonl.pids', within=30)
    c = torch.load(tmp_path/'ck'/'last.pth', weights_only=True)
    assert c['epoch'] == 1 and c['batch'] > 0, (c['epoch'], c['batch'])  # a resumable mid-epoch save

def test_two_c10d_agents_two_nodes_one_process_each(tmp_path):
    "Two torchrun agents on 127.0.0.1 (--nnodes 2, one process each) train one model into a shared folder."
    port, ck = free_port(), tmp_path/'ck'
    args = ['-m', 'codseg', 'train', '--dataset-path', 'synthetic', '--synthetic-n', 20, '--synthetic-size', 64,
            '--img-size', 64, '--backbone', 'edgenext_xx_small', '--no-pretrained', '--num-experts', 3,
            '--num-workers', 0, '--batch-size', 3, '--stage1-epochs', 1, '--epochs', 2, '--checkpoint-dir', ck,
            '--device', 'cpu']
    agents = [start(torchrun(*args, nproc=1, nnodes=2, port=port)) for _ in range(2)]
    (rc0, log0), (rc1, log1) = [finish(p, timeout=180) for p in agents]
    assert rc0 == rc1 == 0, log0[-2000:] + log1[-2000:]
    log = log0 + log1
    assert 'x2 processes' in log and log.count('Epoch 2:') == 1, log[-3000:]
    c = torch.load(ck/'last.pth', weights_only=True)
    assert c['plan']['world_size'] == 2 and [h['epoch'] for h in c['history']] == [1, 2]
