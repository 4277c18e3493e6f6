"""Peak memory of a training step: each EdgeNeXt size and batch size at 384 px, with and without gradient checkpointing.

Configurations run one after the other in one process (each model freed before the next): the CODNet (random init, all parameters training, as in Stage 2), AdamW
over its parameter groups, two training steps (forward, `CODLoss`, backward, clip, step) on a random batch, AMP as
the trainer uses it; the second is measured (the first allocates the optimizer state and sets kernels up).
- CUDA: `torch.cuda.max_memory_allocated()` over the step (everything torch holds: weights, gradients, optimizer
  state, activations, the batch), after `reset_peak_memory_stats`.
- CPU: torch's CPU allocator is invisible to tracemalloc, so the process's peak resident memory (`VmHWM` from
  /proc, reset before the step through /proc/self/clear_refs) minus its resident memory before the model was
  built; the script re-runs itself with glibc told to return large blocks to the system at once
  (`MALLOC_MMAP_THRESHOLD_`), so resident memory follows the tensors alive. It also counts a few MB of allocator
  bookkeeping. A CPU step at 384 px takes seconds to minutes (edgenext_base, batch 4): pass fewer sizes to be quick.
Prints a table (MB) and the figure last: peak with checkpointing / without, for the largest configuration:

    python benchmarks/memory_peak.py [--backbones edgenext_xx_small edgenext_x_small edgenext_small edgenext_base]
                                     [--batches 1 2 4] [--img-size 384] [--device auto]
"""
import argparse, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))

SIZES = ['edgenext_xx_small', 'edgenext_x_small', 'edgenext_small', 'edgenext_base']


def _status(key: str) -> int:
    "A memory figure of this process from /proc/self/status, bytes."
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key + ':')) * 1024


def one(backbone: str, batch: int, ckpt: bool, size: int, device: str) -> dict:
    "Peak memory (bytes) of one training step of this configuration, in this process."
    import torch
    from codseg.config import Config
    from codseg.parts import amp_dtype
    from codseg.losses import CODLoss
    from codseg.model import build_model, param_groups
    dev = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device)
    cfg = Config(backbone=backbone, pretrained=False, grad_checkpointing=ckpt)
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), (torch.rand(batch, 1, size, size) > 0.5).float()
    base = _status('VmRSS') if dev.type == 'cpu' else 0
    model = build_model(cfg).to(dev).train()
    x, y = x.to(dev), y.to(dev)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    loss_fn, dtype = CODLoss(cfg.loss, aux_weight=cfg.aux_weight, balance_weight=cfg.balance_weight), amp_dtype(dev, cfg.amp)
    scaler = torch.amp.GradScaler('cuda', enabled=dtype == torch.float16)
    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None): loss = loss_fn(model(x), y)[0]
        scaler.scale(loss).backward(); scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip); scaler.step(opt); scaler.update()
        opt.zero_grad(set_to_none=True)
    step()  # the first: optimizer state, one-off kernel set-up
    if dev.type == 'cuda': torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    else: open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS
    step()
    if dev.type == 'cuda': torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated()
    else: peak = _status('VmHWM') - base
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {'peak': peak, 'params': params, 'device': str(dev)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--backbones', nargs='+', default=SIZES)
    p.add_argument('--batches', nargs='+', type=int, default=[1, 2, 4])
    p.add_argument('--img-size', type=int, default=384)
    p.add_argument('--device', default='auto')
    a = p.parse_args(argv)
    if 'MALLOC_MMAP_THRESHOLD_' not in os.environ:  # glibc reads it at start: run again with it
        env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': str(1 << 17)}
        sys.exit(subprocess.run([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env=env).returncode)
    import gc, torch
    from common import machine
    one(a.backbones[0], 1, False, 64, a.device); gc.collect()  # torch's one-off allocations happen before any figure
    rows, mb = [], lambda b: b / 2 ** 20
    for bb in a.backbones:
        for bs in a.batches:
            r = {}
            for ck in (False, True):
                r[ck] = one(bb, bs, ck, a.img_size, a.device); gc.collect()
                if torch.cuda.is_available(): torch.cuda.empty_cache()
            rows.append((bb, bs, r))
            print(f'  {bb:18s} batch {bs}: {mb(r[0]["peak"]):7.0f} MB, with checkpointing {mb(r[1]["peak"]):7.0f} MB '
                  f'({r[1]["peak"] / r[0]["peak"]:.2f}x; weights {mb(r[0]["params"]):.0f} MB)', flush=True)
    print(f'peak memory of a training step at {a.img_size} px on {rows[0][2][0]["device"]}, MB without / with gradient '
          f'checkpointing; {machine()}')
    print('| backbone | ' + ' | '.join(f'batch {b}' for b in a.batches) + ' |')
    print('|---|' + '---|' * len(a.batches))
    for bb in a.backbones:
        cells = [f'{mb(r[0]["peak"]):.0f} / {mb(r[1]["peak"]):.0f}' for b_, bs, r in rows if b_ == bb]
        print(f'| {bb} | ' + ' | '.join(cells) + ' |')
    bb, bs, r = rows[-1]
    print(f'grad checkpointing memory ({bb}, batch {bs}): {r[1]["peak"] / r[0]["peak"]:.2f}x')


if __name__ == '__main__':
    main()
