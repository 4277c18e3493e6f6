"""Resized cache: loading a pair from the cache (a second epoch, or a later session) against decoding full-size JPEGs.

One process with one thread (OpenCV and torch), as in one DataLoader worker, over COD10K-sized pairs made here
(1152 x 864 JPEG quality 95 with PNG masks), training transform at `--img-size`. The cache is built first with
`codseg.cache.fill_cache` (timed: the one-off cost, paid in the first session). Then, per pair, side by side:
- full-size decode: `SegDataset.load` (the JPEG and its PNG mask decoded at full size, as without the cache);
- cache read: `SegDataset.load_small` with the cache attached (one .npy entry at the working size, no decoding);
- JPEG q95 + PNG at the working size (for the record: what a ten times smaller cache of re-encoded files costs);
- whole training items without and with the cache (decode or read, augment, normalise, tensors).
The entries were just written, so they are read from the page cache, as in later epochs of a session; the first
epoch of a later session reads them from disk once. Prints the figure last:

    python benchmarks/cache_speed.py [--n 24] [--img-size 384] [--repeats 7]
"""
import sys, tempfile, time
from pathlib import Path
import cv2, numpy as np, torch
sys.path.insert(0, str(Path(__file__).parent))
from common import MEAN, STD, image_bench_args, make_cod10k_like, side_by_side, machine
from codseg.data import SegDataset, train_transform
from codseg.cache import fill_cache, use_cache, read_entry


def main(argv=None):
    a = image_bench_args(__doc__, argv)
    with tempfile.TemporaryDirectory() as td:
        td = Path(td); pairs = make_cod10k_like(td/'data', a.n, a.width, a.height)
        plain = SegDataset(pairs, train_transform(a.img_size, MEAN, STD), seed=0)
        cached = SegDataset(pairs, train_transform(a.img_size, MEAN, STD), seed=0)
        t = time.perf_counter(); made = fill_cache(cached, td/'cache', workers=1); build = (time.perf_counter() - t) / a.n
        assert made == a.n and use_cache(cached, td/'cache', 1) == a.n
        entries = [Path(e) for e in cached.entries]
        mb = sum(e.stat().st_size for e in entries) / a.n / 2 ** 20
        jpgs = []  # the same working-size pixels as JPEG q95 + PNG
        for i, e in enumerate(entries):
            img, mask, _ = read_entry(e)
            jpgs.append((td/f'{i}.jpg', td/f'{i}.png'))
            cv2.imwrite(str(jpgs[-1][0]), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95]); cv2.imwrite(str(jpgs[-1][1]), mask * 255)
        jmb = sum(j.stat().st_size + m.stat().st_size for j, m in jpgs) / a.n / 2 ** 20
        shape = read_entry(entries[0])[0].shape
        epoch = iter(range(10 ** 9))
        passes = {'full-size decode': lambda: [plain.load(i) for i in range(a.n)],
                  'cache read': lambda: [cached.load_small(i) for i in range(a.n)],
                  'JPEG+PNG at working size': lambda: [(cv2.imread(str(j)), cv2.imread(str(m), cv2.IMREAD_UNCHANGED)) for j, m in jpgs],
                  'items, no cache': lambda: (lambda e: [plain[(i, e)] for i in range(a.n)])(next(epoch)),
                  'items, cache': lambda: (lambda e: [cached[(i, e)] for i in range(a.n)])(next(epoch))}
        for f in passes.values(): f()  # warm-up
        med = side_by_side(passes, a.repeats)
    ms = {k: v / a.n * 1e3 for k, v in med.items()}
    print(f'{a.n} pairs {a.width}x{a.height} JPEG q95 + PNG; training transform at {a.img_size} px; entries {shape[1]}x{shape[0]} '
          f'({mb:.2f} MB each as .npy, {jmb:.2f} MB as JPEG q95 + PNG); building took {build * 1e3:.1f} ms per pair; '
          f'1 thread, median of {a.repeats} interleaved passes; {machine()}')
    for k, v in ms.items(): print(f'  {k:26s} {v:6.2f} ms/pair')
    print(f"  whole items: {ms['items, no cache'] / ms['items, cache']:.2f}x faster with the cache; "
          f"JPEG+PNG entries would load {ms['full-size decode'] / ms['JPEG+PNG at working size']:.2f}x faster than full size")
    print(f"cache speedup: {ms['full-size decode'] / ms['cache read']:.1f}x")


if __name__ == '__main__':
    main()
