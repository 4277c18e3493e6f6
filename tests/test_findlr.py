"`codseg find-lr` as fastai does it: smoothed loss, stop at 4x its minimum, valley and steep inside the falling range."
import os, pickle, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch

from conftest import TINY  # the shared tiny settings

def codseg(*args):
    "Run `python -m codseg ARGS` (one intra-op thread): (exit status, stdout, stderr)."
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'codseg', *map(str, args)], capture_output=True, text=True, env=env)
    return r.returncode, r.stdout, r.stderr

pytestmark = pytest.mark.usefixtures('private_cache')

def test_find_lr_suggestion_within_10x_of_an_lr_that_trains_well():
    """On the synthetic set: the sweep stops once the smoothed loss passes 4x its lowest; the valley and steep LRs lie
    where the smoothed loss falls; the suggestion is within 10x of the LR (on a half-decade grid) whose short constant-LR
    run lowers the validation loss most, and itself lowers it."""
    from codseg.config import Config
    from codseg.findlr import find_lr, lr_trial
    from codseg.model import build_model
    cfg = Config(dataset_path='synthetic', accumulation_steps=1, seed=0, **TINY)
    torch.manual_seed(0); net = build_model(cfg)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    res = find_lr(cfg, stage=1, start=1e-6, end=10, steps=60, model=net, progress=True)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items()), 'find_lr did not restore the weights'
    s = np.asarray(res['smooth'])
    assert 'passed 4x its lowest' in res['stopped'] and s[-1] > 4 * s[:-1].min() and (s[:-1] <= 4 * np.minimum.accumulate(s[:-1])).all()
    lrs = np.asarray(res['lrs'])
    for k in ('suggestion', 'steep_lr'):
        i = int(np.argmin(abs(lrs - res[k])))
        assert res[k] <= res['min_lr'] and s[i] < s[len(s) // 10], (k, res)  # inside the falling range
    after = {}
    for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2):
        before, after[lr] = lr_trial(cfg, lr, stage=1, steps=10, model=net)
        print(f'LR {lr:.0e}: validation loss {before:.4f} -> {after[lr]:.4f}')
    good = min(after, key=after.get)
    assert good / 10 <= res['suggestion'] <= good * 10, f"suggestion {res['suggestion']:.2e}, best LR {good:.0e}"
    b, a = lr_trial(cfg, res['suggestion'], stage=1, steps=10, model=net)
    assert a < b, 'a short run at the suggested LR did not improve'

def test_find_lr_cli_stage2_from_checkpoint(ckpt, tmp_path):
    "`codseg find-lr --stage 2 --resume-from CKPT`: a Stage-2 suggestion, a plot; the checkpoint file is untouched."
    before = ckpt.read_bytes()
    rc, out, err = codseg('find-lr', '--stage', 2, '--resume-from', ckpt, '--dataset-path', 'synthetic', '--synthetic-n', 48,
                          '--synthetic-size', 64, '--img-size', 64, '--batch-size', 8, '--accumulation-steps', 1,
                          '--num-workers', 0, '--device', 'cpu', '--steps', 20, '--start', 1e-5, '--end', 1,
                          '--png', tmp_path/'lr.png')
    assert rc == 0, out + err
    assert 'Suggested: --stage2-lr' in out and 'backbone' in out and 'valley' in out and (tmp_path/'lr.png').stat().st_size > 0
    assert ckpt.read_bytes() == before

class Evil:
    def __reduce__(self): return (os.system, ('echo pwned',))

@pytest.mark.parametrize('kind', ['foreign', 'pickle', 'truncated'])
def test_find_lr_bad_checkpoint_one_line(ckpt, tmp_path, kind):
    "A foreign, malicious or truncated checkpoint: one line naming the file, exit 1, never PyTorch's weights_only advice."
    bad = tmp_path/f'{kind}.pth'
    if kind == 'foreign': torch.save({'model': {'w': torch.zeros(3)}, 'config': {'backbone': 'edgenext_xx_small', 'num_experts': 3}}, bad)
    elif kind == 'pickle': bad.write_bytes(pickle.dumps(Evil()))
    else: bad.write_bytes(ckpt.read_bytes()[:5000])
    rc, out, err = codseg('find-lr', '--stage', 1, '--resume-from', bad, '--dataset-path', 'synthetic', '--synthetic-n', 48,
                          '--synthetic-size', 64, '--img-size', 64, '--batch-size', 8, '--num-workers', 0, '--device', 'cpu',
                          '--steps', 20, '--checkpoint-dir', tmp_path/'ck')
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 1 and len(lines) == 1 and str(bad) in lines[0], err
    assert 'weights_only' not in err and 'Traceback' not in err and 'pwned' not in out + err
