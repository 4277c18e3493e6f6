"best_model.pth holds the epoch last.pth calls best, whenever the run is killed around its checkpoint writes."
import os
import pytest
import torch
from codseg.config import Config
from codseg.learner import Callback
from codseg.train import train

TINY = dict(dataset_path='synthetic', synthetic_n=16, synthetic_size=32, img_size=32, backbone='edgenext_xx_small',
            pretrained=False, num_experts=3, epochs=2, stage1_epochs=1, batch_size=8, accumulation_steps=1,
            num_workers=0, scheduler='cosine')
PTH_WRITES = 4  # best_model.pth, then last.pth, in each of the 2 epochs

class Killed(BaseException): "The process dying at this point (nothing after it runs)."

class Rising(Callback):
    "Every epoch's IoU beats the last, so every epoch writes both files."
    order = 65  # after HistoryCB made the row, before CheckpointCB reads it
    def after_epoch(self, learn): learn.history[-1]['iou'] = 0.1 * (learn.epoch + 1)

def load(p): return torch.load(p, weights_only=True) if p.exists() else None

def check(ck, final=False):
    "The invariant on the files in `ck`: best_model.pth holds last.pth's best (or the epoch after last.pth, in flight)."
    last, best = load(ck/'last.pth'), load(ck/'best_model.pth')
    if last is None: return
    assert best is not None, 'last.pth without best_model.pth'
    assert best['epoch'] == best['best_epoch']
    if final or best['epoch'] <= last['epoch']: assert best['epoch'] == last['best_epoch'], (best['epoch'], last['best_epoch'])
    else: assert best['epoch'] == last['epoch'] + 1  # written just before last.pth could record it; resume adopts it
    return last, best

@pytest.mark.parametrize('when', ['before', 'after'])  # the kill just before a rename (the temporary file written) or just after
@pytest.mark.parametrize('k', range(1, PTH_WRITES + 1))
def test_killed_around_checkpoint_writes(monkeypatch, tmp_path, k, when):
    ck, calls, real = tmp_path/'ck', [], os.replace
    def replace(src, dst):
        if str(dst).endswith('.pth'): calls.append(dst)
        if len(calls) == k and str(dst).endswith('.pth') and when == 'before': raise Killed()
        real(src, dst)
        if len(calls) == k and str(dst).endswith('.pth'): raise Killed()
    cfg = Config(**TINY, checkpoint_dir=str(ck))
    with monkeypatch.context() as m:
        m.setattr(os, 'replace', replace)
        with pytest.raises(Killed): train(cfg, callbacks=[Rising()], say=lambda *a, **k: None)
    done = check(ck)
    if not (done and done[0]['epoch'] == 2):  # killed before the run's last write: resume it to the end
        r = train(Config(**TINY, checkpoint_dir=str(ck), resume_from='auto'), callbacks=[Rising()], say=lambda *a, **k: None)
        assert r['stopped'] is None
    last, best = check(ck, final=True)
    assert last['epoch'] == 2 and best['best_epoch'] == 2
    assert all(torch.equal(last['model'][n], best['model'][n]) for n in last['model'])
