"""Trainer overhead: optimizer steps per second of codseg's training loop against a bare PyTorch loop.

Both train the same model (a CODNet on `--backbone`, random init, two copies of the same weights) on the same
in-memory batches (`--batch` items at `--img-size` from the synthetic dataset, already on the device), with the
same loss (`CODLoss`), AdamW over the same parameter groups, gradient clipping at `--grad-clip` (the same update),
one batch per step, everything trainable (Stage 2), AMP as the trainer would use it (bf16/fp16 on CUDA, none on CPU).
- codseg: `codseg.train.make_learner` (the trainer's Learner and callbacks: stage, LR plan, gradient guard, metrics,
  progress bar, history, watch, stop signal, checkpoint, session limit, AMP on CUDA), its loaders swapped for the
  in-memory batches; one epoch per repeat, its training pass timed (validation and the once-an-epoch writing of
  history, curves and checkpoint are not part of a step);
- bare: `for x, y in batches: loss = loss_fn(model(x), y)[0]; loss.backward(); clip_grad_norm_(...); opt.step();
  opt.zero_grad()` under the same autocast.
The two alternate, `--repeats` times; medians. One more codseg pass, untimed, counts the host reads (`Tensor.item`,
`.tolist`, `.cpu`, `.numpy`, `bool()`/`float()`/`int()` of a tensor) per optimizer step in its batches and steps (data
loading and the optimizer's host-side step counters aside): at most 1. Prints steps/s of each, then the figure last
(codseg / bare) with the reads per step beside it:

    python benchmarks/trainer_overhead.py [--backbone edgenext_xx_small] [--img-size 128] [--batch 8] [--batches 6] [--repeats 5] [--threads N]
"""
import argparse, copy, math, os, statistics, sys, tempfile, time, traceback
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from common import machine
from codseg.config import Config
from codseg.learner import Callback, to_device
from codseg.parts import amp_dtype
from codseg.losses import CODLoss
from codseg.model import param_groups


class Batches(list):
    "In-memory batches standing in for a DataLoader: what the trainer's callbacks touch (batch_size, sampler.set_epoch)."
    def __init__(self, batches, batch_size): super().__init__(batches); self.batch_size, self.sampler = batch_size, self
    def set_epoch(self, epoch, start=0): pass


class Clock(Callback):
    "Time the training pass: start before every other callback's before_train, stop after every after_train."
    def __init__(self, sync, first): self.sync, self.times, self.order, self.first = sync, [], -10 ** 6 if first else 10 ** 6, first
    def before_train(self, learn):
        if self.first: self.sync(); Clock.t0 = time.perf_counter()
    def after_train(self, learn):
        if not self.first: self.sync(); self.times.append(time.perf_counter() - Clock.t0)


READS = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__', '__index__')

class ReadCounter(Callback):
    "Count host reads inside the training batches and steps (on from before_batch/before_step, off after them)."
    order = 10 ** 6  # its after_* run last; its before_* are wrapped to run first by `install`
    def __init__(self): self.on, self.reads, self.steps = False, 0, 0
    def begin(self, learn): self.on = learn.training
    def after_batch(self, learn): self.on = False
    after_cancel_batch = after_batch
    def after_step(self, learn): self.on = False; self.steps += 1
    after_cancel_step = after_step
    def install(self, learn):
        "Patch the tensor methods that read the device; returns a function that undoes it."
        first = type('First', (Callback,), {'order': -10 ** 6, 'before_batch': lambda _, l: self.begin(l),
                                            'before_step': lambda _, l: self.begin(l)})()
        learn.add_cb(first); learn.add_cb(self)
        old = {n: getattr(torch.Tensor, n) for n in READS}
        def counting(f):
            def g(t, *a, **k):
                if self.on and '/torch/optim/' not in traceback.extract_stack(limit=2)[0].filename: self.reads += 1
                return f(t, *a, **k)
            return g
        for n, f in old.items(): setattr(torch.Tensor, n, counting(f))
        def undo():
            for n, f in old.items(): setattr(torch.Tensor, n, f)
            learn.cbs.remove(first); learn.cbs.remove(self)
        return undo


class Bare:
    "A plain PyTorch training loop: forward, loss, backward, clip, step, with the trainer's AMP choice."
    def __init__(self, model, cfg, device, sync):
        self.model, self.cfg, self.sync, self.dtype = model, cfg, sync, amp_dtype(device, cfg.amp)
        self.opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.loss_fn = CODLoss(cfg.loss, aux_weight=cfg.aux_weight, balance_weight=cfg.balance_weight)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.auto = (lambda: torch.autocast(device.type, dtype=self.dtype)) if self.dtype else nullcontext

    def run(self, batches) -> float:
        "One pass over `batches`; seconds."
        m, opt, sc, clip = self.model.train(), self.opt, self.scaler, self.cfg.grad_clip
        self.sync(); t = time.perf_counter()
        for b in batches:
            with self.auto(): loss = self.loss_fn(m(b['image']), b['mask'])[0]
            sc.scale(loss).backward()
            if clip: sc.unscale_(opt); torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            sc.step(opt); sc.update(); opt.zero_grad(set_to_none=True)
        self.sync(); return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--backbone', default='edgenext_xx_small')
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--batches', type=int, default=6, help='steps per repeat')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--device', default='auto')
    p.add_argument('--threads', type=int, help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    old_cache = os.environ.get('CODSEG_CACHE')
    with tempfile.TemporaryDirectory() as td:
        os.environ['CODSEG_CACHE'] = str(Path(td)/'cache')  # the synthetic dataset goes there
        from codseg.train import Dist, Run, StageCB, make_learner
        cfg = Config(dataset_path='synthetic', synthetic_n=max(16, a.batch * 2), synthetic_size=a.img_size, img_size=a.img_size,
                     backbone=a.backbone, pretrained=False, batch_size=a.batch, accumulation_steps=1, num_workers=0,
                     stage1_epochs=1, skip_stage1=True, epochs=10 ** 4, checkpoint_dir=str(Path(td)/'ck'), device=a.device)
        dist = Dist(cfg.device); dev = dist.device
        sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
        run = Run(cfg, dist, kaggle_input=str(Path(td)/'none'), say=lambda *x: None)
        bare_loop = Bare(copy.deepcopy(run.model).to(dev), run.cfg, dev, sync)
        Path(cfg.checkpoint_dir).mkdir()
        ds = run.data.train_ds
        coll = torch.utils.data.default_collate
        batches = Batches([to_device(coll([ds[(i * a.batch + k) % len(ds)] for k in range(a.batch)]), dev) for i in range(a.batches)], a.batch)
        start, stop = Clock(sync, True), Clock(sync, False)
        learn = make_learner(run, [start, stop])
        for cb in learn.cbs:
            if isinstance(cb, StageCB): cb.loaders = {1: batches, 2: batches}
        learn.train_dl, learn.valid_dl = batches, Batches(batches[:1], a.batch)
        epoch, bare = run.start[0], []
        for r in range(a.repeats + 1):  # the first of each is a warm-up
            learn.fit(range(epoch + r, epoch + r + 1))
            bare.append(bare_loop.run(batches))
        codseg_s, bare_s = statistics.median(stop.times[1:]), statistics.median(bare[1:])
        counter = ReadCounter(); undo = counter.install(learn)
        try: learn.fit(range(epoch + a.repeats + 1, epoch + a.repeats + 2))  # untimed: the reads per step
        finally: undo()
    if old_cache is None: os.environ.pop('CODSEG_CACHE')
    else: os.environ['CODSEG_CACHE'] = old_cache
    rate = {'codseg': a.batches / codseg_s, 'bare': a.batches / bare_s}
    print(f'{a.backbone} at {a.img_size} px, batch {a.batch}, {a.batches} steps a repeat, grad clip {cfg.grad_clip}, {dev}, '
          f'AMP {amp_dtype(dev, cfg.amp)}, torch threads {torch.get_num_threads()}, median of {a.repeats} interleaved repeats; {machine()}')
    for k, v in rate.items(): print(f'  {k:8s} {v:7.2f} steps/s ({1e3 / v:.0f} ms/step)')
    print(f"trainer overhead: {rate['codseg'] / rate['bare']:.3f}x (host reads per step: {counter.reads / counter.steps:.2f})")


if __name__ == '__main__':
    main()
