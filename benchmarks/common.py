"""Shared by the benchmark scripts: COD10K-sized test data, side-by-side timing, and a line on the machine."""
import argparse, os, platform, statistics, time
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


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as timm's EdgeNeXt configs give


def image_bench_args(doc: str, argv=None):
    "The flags of the image benchmarks (how many COD10K-like JPEGs, their size, the training size, repeats), parsed; one thread each."
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument('--n', type=int, default=24, help='pairs made and read per pass')
    p.add_argument('--img-size', type=int, default=384)
    p.add_argument('--width', type=int, default=1152); p.add_argument('--height', type=int, default=864)
    p.add_argument('--repeats', type=int, default=7)
    cv2.setNumThreads(1); torch.set_num_threads(1)  # per-worker figures
    return p.parse_args(argv)


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
