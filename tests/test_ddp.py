"Two processes on CPU (gloo) through torchrun: train both stages, checkpoint, resume in one process, exact metrics."
import os, subprocess, sys
import pytest
import torch
from codseg.train import validate

def run(*args):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('data')/'COD10K-v3'
    run('-m', 'codseg', 'make-synthetic', d, '--n', 30, '--size', 64, '--seed', 5)
    return d

def test_two_processes_train_resume_and_agree(data, tmp_path):
    ck = tmp_path/'ck'
    args = ['--dataset-path', data, '--backbone', 'edgenext_xx_small', '--no-pretrained', '--img-size', 64,
            '--stage1-epochs', 1, '--batch-size', 3, '--stage2-batch-size', 2, '--accumulation-steps', 2,
            '--num-workers', 0, '--num-experts', 3, '--checkpoint-dir', ck, '--progressive-unfreeze', '--scheduler', 'cosine']
    r = run('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'codseg', 'train', *args, '--epochs', 4, '--stop-after', 3)
    assert 'x2 processes' in r.stdout and r.stdout.count('Epoch 3:') == 1  # one process prints
    ckpt = torch.load(ck/'last.pth', weights_only=True)
    assert ckpt['plan']['world_size'] == 2 and [h['stage'] for h in ckpt['history']] == [1, 2, 2]
    # the exactly reduced validation metrics of the 2-process run equal one process's on the same weights
    m = validate(ck/'last.pth', device='cpu', num_workers=0)
    assert m['iou'] == pytest.approx(ckpt['history'][-1]['iou'], abs=1e-9)
    assert m['dice'] == pytest.approx(ckpt['history'][-1]['dice'], abs=1e-9)
    # and the checkpoint resumes in a single process
    r = run('-m', 'codseg', 'train', *args, '--epochs', 4, '--resume-from', 'auto')
    assert 'Epoch 4:' in r.stdout and 'processes 2 -> 1' in r.stdout, r.stdout
