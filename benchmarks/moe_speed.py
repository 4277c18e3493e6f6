"""MoE block speed: the vectorised CueMoE against the same experts applied by a per-sample loop with top-k.

Forward + backward of `codseg.model.CueMoE` on a batch of 8 at the size where CODNet uses it (the coarsest
decoder map: `decoder_channels` wide, input size / coarsest backbone stride): `CueMoE.forward` (all (image,
expert) pairs at once) against `CueMoE.forward_per_sample` (a loop over images and their top-k picks, each expert
written out plainly with `F.conv2d`), both timed alternately, median of several runs. Two routings:

- `init`: the router as initialised, on random features (it sends the batch to a few experts only);
- `spread`: the same router with its picks spread over all experts, as after training with the balance loss.

And two settings of glibc's malloc, in this order: as it comes, then keeping freed memory for reuse. As it comes,
glibc hands blocks over 128 KB back to the OS when they are freed and page-faults them in again when the next step
allocates them, which taxes only the batched code (the loop's tensors are smaller than that). PyTorch on a GPU
reuses freed blocks through its caching allocator, and PyTorch's performance tuning guide suggests an allocator
that reuses them on CPU (jemalloc, tcmalloc); `keep_freed_memory` has glibc do the same, through `mallopt`.

Prints one line per setting, routing and version; then the `init` figure and the `spread` figure with malloc as it
comes; then `moe speedup: N.Nx` last: the `spread` routing with freed memory kept (what a trained router sees, on
an allocator that reuses memory as PyTorch's does on a GPU).

    python benchmarks/moe_speed.py [--img-size 384] [--batch 8] [--runs 21] [--device auto]
"""
import argparse, ctypes, statistics, time
import torch
from codseg.config import Config
from codseg.model import CueMoE
from codseg.losses import balance_loss

def spread_routing(moe: CueMoE, batch: int):
    "Replace the router's picks by ones spread evenly over the experts (gates and routing statistics still computed)."
    E, k, route = moe.router.proj.out_features, moe.router.top_k, type(moe.router).forward.__get__(moe.router)
    picks = (torch.arange(batch * k) % E).view(batch, k)  # k consecutive experts per image: distinct as k <= E
    def forward(x):
        gates, idx, stats = route(x)
        return gates, picks.to(idx.device), stats
    moe.router.forward = forward

def keep_freed_memory() -> bool:
    "Have glibc keep freed blocks for reuse instead of returning them to the OS; False where libc is not glibc."
    try: mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError): return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, 64 << 20))  # 32 MB: glibc's maximum

def time_both(moe: CueMoE, x: torch.Tensor, runs: int) -> dict:
    "Median seconds of forward+backward for the vectorised block and the per-sample loop, timed alternately."
    sync = torch.cuda.synchronize if x.device.type == 'cuda' else (lambda: None)
    def step(fn):
        moe.zero_grad(set_to_none=True); x.grad = None
        sync(); t = time.perf_counter()
        y, stats = fn(x); (y.square().mean() + balance_loss(stats)).backward()
        sync(); return time.perf_counter() - t
    fns = {'vectorised': moe.forward, 'per-sample loop': moe.forward_per_sample}
    (y1, _), (y2, _) = moe(x), moe.forward_per_sample(x)
    assert torch.allclose(y1, y2, atol=1e-4), 'the two versions disagree'
    for _ in range(10):  # warm-up: the first steps of a process run slower (allocator, oneDNN primitive caches)
        for fn in fns.values(): step(fn)
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items(): times[k].append(step(fn))
    return {k: statistics.median(v) for k, v in times.items()}

def main(argv=None):
    c = Config()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--img-size', type=int, default=c.img_size)
    p.add_argument('--stride', type=int, default=32, help="the coarsest backbone stride (edgenext's)")
    p.add_argument('--channels', type=int, default=64, help="CODNet's decoder_channels")
    p.add_argument('--num-experts', type=int, default=c.num_experts)
    p.add_argument('--top-k', type=int, default=c.top_k)
    p.add_argument('--runs', type=int, default=21)
    p.add_argument('--device', default='auto')
    a = p.parse_args(argv)
    dev = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if a.device == 'auto' else a.device)
    torch.manual_seed(0)
    moe = CueMoE(a.channels, a.num_experts, a.top_k).to(dev)
    s = a.img_size // a.stride
    x = torch.randn(a.batch, a.channels, s, s, device=dev, requires_grad=True)
    print(f'CueMoE forward+backward, batch {a.batch}, {a.channels} ch, {s}x{s} map (img {a.img_size} / stride {a.stride}), '
          f'{a.num_experts} experts, top-{a.top_k}, {dev}, torch threads {torch.get_num_threads()}, median of {a.runs}')
    speedup = {}
    for malloc in ('as it comes', 'keeping freed memory'):
        if malloc != 'as it comes' and not keep_freed_memory(): break
        print(f' malloc {malloc}:')
        for routing in ('init', 'spread'):
            if routing == 'init': moe.router.__dict__.pop('forward', None)  # the router's own forward
            else: spread_routing(moe, a.batch)
            used = moe.router(x)[1].unique().numel()
            med = time_both(moe, x, a.runs)
            speedup[malloc, routing] = med['per-sample loop'] / med['vectorised']
            print(f'  routing {routing} ({used} of {a.num_experts} experts used): {speedup[malloc, routing]:.2f}x')
            for k, v in med.items(): print(f'    {k:16s} {v * 1e3:8.2f} ms')
    last = malloc if (malloc, 'spread') in speedup else 'as it comes'
    print(f"moe speedup, malloc {last}, routing as initialised: {speedup[last, 'init']:.1f}x")
    print(f"moe speedup, malloc as it comes: {speedup['as it comes', 'spread']:.1f}x")
    print(f"moe speedup: {speedup[last, 'spread']:.1f}x")

if __name__ == '__main__':
    main()
