"""Scoring released maps: the same maps scored by codseg.maps with one process and with every core, side by side.

COD10K-sized test pairs made here (`--width` x `--height` camouflage scenes, JPEG images with PNG masks) and one
method's maps for them (each mask blurred and noised, as a model's soft output, saved as 8-bit PNG); then
`codseg.maps.score_method` on them, no cache, with `--num-workers 1` (in this process) and with `--num-workers N`
(N = all cores by default: worker processes, chunks of codseg.maps.CHUNK images), repeated and interleaved, medians
reported, after one untimed map (the imports). The two results are checked identical. Prints the figure last:

    python benchmarks/score_speed.py [--n 48] [--width 1024] [--height 768] [--repeats 3] [--workers N]
"""
import argparse, os, sys, tempfile
from pathlib import Path
import cv2, numpy as np
sys.path.insert(0, str(Path(__file__).parent))
from common import make_cod10k_like, machine, side_by_side
from codseg.maps import load_method, score_method


def write_maps(pairs, out: Path, seed=0):
    "A soft map per mask (Gaussian blur, noise), named after the image, 8-bit PNG."
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for p in pairs:
        gt = cv2.imread(str(p.mask), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
        soft = cv2.GaussianBlur(gt, (0, 0), 6) * 0.85 + rng.random(gt.shape, dtype=np.float32) * 0.2
        cv2.imwrite(str(out/f'{p.name}.png'), (np.clip(soft, 0, 1) * 255).round().astype(np.uint8))


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument('--n', type=int, default=48, help='test pairs (and maps) made and scored')
    a.add_argument('--width', type=int, default=1024); a.add_argument('--height', type=int, default=768)
    a.add_argument('--repeats', type=int, default=3)
    a.add_argument('--workers', type=int, default=os.cpu_count(), help='the parallel side (default: all cores)')
    a = a.parse_args(argv)
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        pairs = make_cod10k_like(td/'COD10K', a.n, a.width, a.height)
        write_maps(pairs, td/'Net'/'COD10K')
        sets, method, out = {'COD10K': pairs}, load_method('Net', td/'Net'), {}
        run = lambda w: out.__setitem__(w, score_method(method, sets, workers=w, say=lambda *_: None, progress=True))
        score_method(method, {'COD10K': pairs[:1]}, say=lambda *_: None, progress=True)  # warm-up: imports, first calls
        t = side_by_side({'1 process': lambda: run(1), f'{a.workers} workers': lambda: run(a.workers)}, a.repeats)
    assert out[1] == out[a.workers], 'one process and several gave different results'
    print(machine())
    print(f'{a.n} maps of {a.width}x{a.height}, Sm {out[1]["COD10K"]["Sm"]:.4f}, {a.repeats} repeats (medians):')
    for k, s in t.items(): print(f'  {k:<12} {s:7.2f} s  ({a.n / s:5.1f} maps/s)')
    print(f'score speedup ({a.workers} workers vs 1 process): {t["1 process"] / t[f"{a.workers} workers"]:.2f}x')


if __name__ == '__main__':
    main()
