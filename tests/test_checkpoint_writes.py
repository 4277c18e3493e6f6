"best_model.pth holds the epoch last.pth calls best at every instant, wherever a run is killed around its writes."
import os, shutil, signal
import pytest
import torch
from codseg.config import Config
from codseg.learner import Callback
from codseg.runtime import CheckpointPair
from codseg.schedule import PlanComplete
from codseg.train import train

TINY = dict(dataset_path='synthetic', synthetic_n=16, synthetic_size=32, img_size=32, backbone='edgenext_xx_small',
            pretrained=False, num_experts=3, epochs=2, stage1_epochs=1, batch_size=8, accumulation_steps=1,
            num_workers=0, scheduler='cosine')
CALLS = [(os, 'replace'), (os, 'link'), (os, 'symlink'), (os, 'unlink'), (shutil, 'rmtree'), (torch, 'save')]

class Killed(BaseException): "The process dying at this point."

class Killer:
    "Kill at the `k`-th file-system call (`before` or `after` it); once dead, every later call dies too."
    def __init__(self, monkeypatch, k, when):
        self.k, self.when, self.n, self.dead = k, when, 0, False
        for mod, name in CALLS: monkeypatch.setattr(mod, name, self.wrap(getattr(mod, name)))
    def wrap(self, real):
        def f(*a, **kw):
            if self.dead: raise Killed()
            self.n += 1
            if self.n == self.k and self.when == 'before': self.die()
            try: return real(*a, **kw)
            finally:  # also after a call that failed (a missing file to remove)
                if self.n == self.k: self.die()
        return f
    def die(self):
        self.dead = True
        raise Killed()

def load(p): return torch.load(p, weights_only=True) if p.is_file() else None

def held(ck):
    "(the epoch best_model.pth holds, the epoch last.pth calls best); None for a missing file."
    last, best = load(ck/'last.pth'), load(ck/'best_model.pth')
    return best and best['epoch'], last and last['best_epoch']

def check(ck):
    "The invariant, on the files in `ck` as they are."
    best, called = held(ck)
    if called is not None: assert best == called, f'best_model.pth holds {best}, last.pth calls {called} best'

# the pair alone, through two sessions of five epochs: killed at every file-system call it makes
EPOCHS = [(1, 1), (2, 1), (3, 3), (4, 3), (5, 5)]  # (epoch, the best epoch so far)

def session(out, done):
    "Open the pair, save the epochs after `done`, close it (a run ending normally)."
    pair = CheckpointPair(out).open()
    for e, best in EPOCHS[done:]: pair.save({'epoch': e, 'best_epoch': best}, best=e == best)
    pair.close()

def test_pair_killed_at_every_call(tmp_path):
    killed, k = 0, 0
    while True:
        k += 1
        for when in ('before', 'after'):
            out = tmp_path/f'{k}{when}'
            with pytest.MonkeyPatch.context() as m:
                kill = Killer(m, k, when)
                try: session(out, 0)
                except Killed: killed += 1
            check(out)
            session(out, (load(out/'last.pth') or {'epoch': 0})['epoch'])  # the resumed run ends as plain files
            assert held(out) == (5, 5) and sorted(os.listdir(out)) == ['best_model.pth', 'last.pth']
        if kill.n < k: break  # the run made fewer than k calls: every point has been tried
    assert killed > 50, killed  # links, renames, removals and saves of 5 epochs were all hit

def test_pair_without_symlinks(tmp_path, monkeypatch):
    "Where links do not work: plain files, best_model.pth first; killed between, it is one epoch ahead."
    def refuse(*a, **kw): raise OSError(1, 'Operation not permitted')
    monkeypatch.setattr(os, 'symlink', refuse)
    pair = CheckpointPair(tmp_path).open()
    assert not pair.linked
    pair.save({'epoch': 1, 'best_epoch': 1}, best=True)
    pair.save({'epoch': 2, 'best_epoch': 1})
    pair.close()
    assert held(tmp_path) == (1, 1) and sorted(os.listdir(tmp_path)) == ['best_model.pth', 'last.pth']

# whole training runs: every epoch a new best, killed around each of their file-system calls
class Rising(Callback):
    "Every epoch's IoU beats the last, so every epoch writes both files."
    order = 65  # after HistoryCB made the row, before CheckpointCB reads it
    def after_epoch(self, learn): learn.history[-1]['iou'] = 0.1 * (learn.epoch + 1)

def run(ck, **kw):
    return train(Config(**TINY, checkpoint_dir=str(ck), **kw), callbacks=[Rising()], say=lambda *a, **k: None)

@pytest.fixture(scope='module')
def n_calls(tmp_path_factory):
    "How many file-system calls a whole run makes (after one that made the synthetic data's cache)."
    run(tmp_path_factory.mktemp('warm'))
    out = tmp_path_factory.mktemp('count')
    with pytest.MonkeyPatch.context() as m:
        kill = Killer(m, 0, 'never')
        run(out)
    return kill.n

@pytest.mark.parametrize('when', ['before', 'after'])
@pytest.mark.parametrize('at', [i / 6 for i in range(1, 6)] + [1.0])  # spread over the run's calls, up to the last
def test_run_killed_around_checkpoint_writes(tmp_path, n_calls, at, when):
    ck, handlers = tmp_path/'ck', {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.MonkeyPatch.context() as m:
        Killer(m, max(1, round(at * n_calls)), when)
        with pytest.raises(Killed): run(ck)
    for s, h in handlers.items(): signal.signal(s, h)  # a dead run's handlers, which its cleanup could not remove
    check(ck)
    last = load(ck/'last.pth')
    if last and last['epoch'] == 2:  # killed after the last save: the run is complete, its links become files
        with pytest.raises(PlanComplete): run(ck, resume_from='auto')
    else: assert run(ck, resume_from='auto')['stopped'] is None  # resumed to the end
    check(ck)
    last, best = load(ck/'last.pth'), load(ck/'best_model.pth')
    assert last['epoch'] == 2 and best['best_epoch'] == 2
    assert all(torch.equal(last['model'][n], best['model'][n]) for n in last['model'])
    assert sorted(p.name for p in ck.glob('*.pth')) == ['best_model.pth', 'last.pth']
    assert not any(p.is_symlink() for p in ck.iterdir()) and not (ck/CheckpointPair.folder).exists()

class Falling(Callback):
    "Every epoch's IoU is worse than any before."
    order = 65
    def after_epoch(self, learn): learn.history[-1]['iou'] = 0.01

def test_run_without_symlinks_killed_between_the_writes(tmp_path, monkeypatch):
    "Plain files: killed after epoch 2's best_model.pth, before its last.pth; the resume adopts that best."
    def refuse(*a, **kw): raise OSError(1, 'Operation not permitted')
    monkeypatch.setattr(os, 'symlink', refuse)
    ck, real, seen = tmp_path/'ck', os.replace, []
    def replace(src, dst):
        real(src, dst)
        seen.append(os.path.basename(dst))
        if seen.count('best_model.pth') == 2: raise Killed()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, 'replace', replace)
        with pytest.raises(Killed): run(ck)
    assert held(ck) == (2, 1)  # the moment between the two writes, which only plain files have
    cfg = Config(**TINY, checkpoint_dir=str(ck), resume_from='auto')
    assert train(cfg, callbacks=[Falling()], say=lambda *a, **k: None)['stopped'] is None  # epoch 2 again, worse
    assert held(ck) == (2, 2)  # best_model.pth's epoch 2 stays the best, and last.pth says so
