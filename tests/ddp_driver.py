"""Training routes for tests/test_ddp.py, run alone or under torchrun: `python ddp_driver.py OUT ROUTES_JSON`.

ROUTES_JSON maps a route name to its sessions, each a dict of `Config` fields plus test hooks: `signal_at`
([name, step]: every process sends itself that signal after that global step), `agent_signal_at` ([name, step]:
rank 0 sends it to its parent, torchrun's agent), `kill_rank_at` ([rank, step]: SIGKILL that rank there),
`fast_clock_rank` (that rank's clock runs 100x fast), `chdir` (each process's working folder; `{rank}` in it
makes one per rank: relative paths then name other files on each "node"). Every
process appends its pid to OUT.pids; after every epoch the processes' weight digests are gathered, and rank 0
appends them to OUT (JSON lines), with each session's outcome.
"""
import hashlib, json, os, signal, sys, time
import torch, torch.distributed as dist
from codseg.config import Config
from codseg.learner import Callback, unwrap
from codseg.train import train

RANK = int(os.environ.get('RANK', 0))

def digest(model) -> str:
    "A digest of `model`'s weights, bit for bit."
    h = hashlib.sha1()
    for v in unwrap(model).state_dict().values(): h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

def gathered(obj) -> list:
    "Every process's `obj`."
    if not dist.is_initialized(): return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

class Record(Callback):
    "After each epoch, rank 0 writes every process's weight digest (and EMA digest) to `out`."
    order = 85  # after the epoch's checkpoint, before a session limit or a stop signal ends the fit
    def __init__(self, out, route): self.out, self.route = out, route
    def after_epoch(self, learn):
        views = gathered(digest(learn.model))
        if RANK == 0: write(self.out, route=self.route, epoch=learn.epoch + 1, digests=views)

class Hooks(Callback):
    "The test hooks of a session: a signal to every process, or SIGKILL to one, after a global step."
    order = 0
    def __init__(self, signal_at=None, kill_rank_at=None, agent_signal_at=None):
        self.sig, self.kill, self.agent = signal_at, kill_rank_at, agent_signal_at
    def after_step(self, learn):
        if self.sig and learn.step_idx == self.sig[1]: os.kill(os.getpid(), getattr(signal, self.sig[0]))
        if self.agent and RANK == 0 and learn.step_idx == self.agent[1]:
            os.kill(os.getppid(), getattr(signal, self.agent[0]))
        if self.kill and RANK == self.kill[0] and learn.step_idx == self.kill[1]: os.kill(os.getpid(), signal.SIGKILL)

def write(out, **row):
    with open(out, 'a') as f: f.write(json.dumps(row) + '\n')

def fast_clock():
    "This process's clock runs 100x fast from now on (a skewed clock)."
    real, t0 = time.time, time.time()
    time.time = lambda: t0 + 100 * (real() - t0)

def main(out, routes):
    rc = 0
    with open(out + '.pids', 'a') as f: f.write(f'{os.getpid()}\n')
    for route, sessions in json.loads(routes).items():
        for s in sessions:
            s = dict(s)
            hooks = Hooks(s.pop('signal_at', None), s.pop('kill_rank_at', None), s.pop('agent_signal_at', None))
            if s.pop('fast_clock_rank', None) == RANK: fast_clock()
            if 'chdir' in s: os.chdir(s.pop('chdir').format(rank=RANK))
            r = train(Config(**s), callbacks=[hooks, Record(out, route)])
            if RANK == 0: write(out, route=route, stopped=r['stopped'], signal=r['signal'], last_epoch=r['last_epoch'])
            rc = 128 + r['signal'] if r['signal'] else 0  # the last session's status, as codseg train's
    return rc

if __name__ == '__main__': sys.exit(main(*sys.argv[1:]))
