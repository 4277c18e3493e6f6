"Fixtures the end-to-end tests share: a private synthetic-data cache with one torch thread, and a tiny checkpoint."
import hashlib, os
from pathlib import Path
import pytest, torch

TINY = dict(synthetic_n=48, synthetic_size=64, img_size=64, backbone='edgenext_xx_small', pretrained=False, num_experts=3,
            batch_size=8, num_workers=0, device='cpu')  # the smallest run that still learns the synthetic set

@pytest.fixture(scope='module')
def private_cache(tmp_path_factory):
    """A private cache for the synthetic dataset (inherited by subprocesses); one torch thread: these models are tiny, and
    on a CPU shared with other test processes two spinning OpenMP threads per process run 5-10x slower than one."""
    old, threads = os.environ.get('CODSEG_CACHE'), torch.get_num_threads()
    os.environ['CODSEG_CACHE'] = str(tmp_path_factory.mktemp('cache'))
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if old is None: del os.environ['CODSEG_CACHE']
    else: os.environ['CODSEG_CACHE'] = old

@pytest.fixture(scope='module')
def ckpt(tmp_path_factory, private_cache):
    "A tiny checkpoint: two epochs (one per stage) on the synthetic dataset."
    from codseg.config import Config
    from codseg.train import train
    d = tmp_path_factory.mktemp('run')
    train(Config(dataset_path='synthetic', epochs=2, stage1_epochs=1, lr=2e-3, checkpoint_dir=str(d), **TINY),
          say=lambda *a: None)
    return d/'best_model.pth'


def tree_hash(root) -> str:
    "sha256 over the relative paths and bytes of every file under `root`: whether a folder changed at all."
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob('*')):
        if p.is_file(): h.update(str(p.relative_to(root)).encode()); h.update(p.read_bytes())
    return h.hexdigest()
