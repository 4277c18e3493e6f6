"""Shared by the benchmark scripts: COD10K-sized test data, side-by-side timing, and a line on the machine."""
import os, platform, statistics, time
from pathlib import Path
import cv2, numpy as np, torch
from codseg.layout import Pair
from codseg.synthetic import make_scene


def make_cod10k_like(root, n: int, width: int = 1152, height: int = 864, quality: int = 95, seed: int = 0) -> list[Pair]:
    "`n` camouflage scenes of `width` x `height` (about 1 MP, COD10K's size) as JPEG `quality` with PNG masks under `root`."
    root = Path(root); root.mkdir(parents=True, exist_ok=True)
    rng, pairs = np.random.default_rng(seed), []
    for i in range(n):
        img, mask = make_scene(rng, max(width, height))
        img, mask = img[:height, :width], mask[:height, :width]
        cv2.imwrite(str(root/f'{i:04d}.jpg'), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        cv2.imwrite(str(root/f'{i:04d}.png'), mask)
        pairs.append(Pair(root/f'{i:04d}.jpg', root/f'{i:04d}.png', f'{i:04d}'))
    return pairs


def side_by_side(fns: dict, repeats: int) -> dict:
    "Median seconds of each of `fns` (name -> no-argument callable), run in turn `repeats` times, order rotating."
    names, times = list(fns), {k: [] for k in fns}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter(); fns[k](); times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def machine() -> str:
    "CPU, cores, load and library versions, for the record."
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor()) \
        if Path('/proc/cpuinfo').exists() else platform.processor()
    load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
    gpu = f', GPU {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''
    return (f'{cpu}, {os.cpu_count()} cores, load {load}{gpu}; torch {torch.__version__}, OpenCV {cv2.__version__}, '
            f'numpy {np.__version__}')
