"""Data pipeline speed: codseg's training items per second per worker, against decode-only and PIL + torchvision.

One process with one thread (OpenCV and torch), as in one DataLoader worker, over COD10K-sized pairs made here
(1152 x 864 JPEG quality 95, about 1 MP, with PNG masks). Per item:
- decode-only: `cv2.imdecode` of the JPEG and of its PNG mask at full size, nothing else (the floor OpenCV sets for
  any pipeline that reads full-size files);
- codseg: `SegDataset` with `train_transform` (a whole training item: decode, augment, normalise, tensors);
- PIL + torchvision: `Image.open(...).convert`, then torchvision.transforms.v2 with the same augmentations
  (RandomResizedCrop, flips, RandomAffine, ColorJitter, Normalize) on the image and the mask;
- codseg eval (for the record): `SegDataset` with `eval_transform` (JPEGs decoded reduced, see nbs/02_data).
Each pipeline makes one pass over the pairs in turn, `--repeats` times; medians. Prints items/s, then the two
ratios, the figure last:

    python benchmarks/loader_speed.py [--n 24] [--img-size 384] [--repeats 7]
"""
import sys, tempfile
from pathlib import Path
import cv2, numpy as np, torch
sys.path.insert(0, str(Path(__file__).parent))
from common import MEAN, STD, image_bench_args, make_cod10k_like, side_by_side, machine
from codseg.data import SegDataset, train_transform, eval_transform



def pil_torchvision(size: int):
    "A plain PIL + torchvision (v2) item function with codseg's training augmentations."
    import torchvision.transforms.v2 as T
    from torchvision import tv_tensors
    from PIL import Image
    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)), T.RandomHorizontalFlip(0.5),
                    T.RandomVerticalFlip(0.1), T.RandomApply([T.RandomAffine(15)], p=0.5),
                    T.RandomApply([T.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5), T.ToImage(),
                    T.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.float32, 'others': None}, scale=True),
                    T.Normalize(MEAN, STD)])
    def item(pair):
        img = Image.open(pair.image).convert('RGB')
        mask = tv_tensors.Mask(torch.from_numpy((np.asarray(Image.open(pair.mask).convert('L')) > 127).astype(np.uint8))[None])
        return tf(img, mask)
    return item


def decode_only(pair):
    "Full-size decode of the image and its mask, nothing else."
    return (cv2.imdecode(np.fromfile(pair.image, np.uint8), cv2.IMREAD_COLOR),
            cv2.imdecode(np.fromfile(pair.mask, np.uint8), cv2.IMREAD_UNCHANGED))


def main(argv=None):
    a = image_bench_args(__doc__, argv)
    with tempfile.TemporaryDirectory() as td:
        pairs = make_cod10k_like(td, a.n, a.width, a.height)
        kb = sum(q.image.stat().st_size for q in pairs) / len(pairs) / 1024
        train = SegDataset(pairs, train_transform(a.img_size, MEAN, STD), seed=0)
        ev = SegDataset(pairs, eval_transform(a.img_size, MEAN, STD))
        pil, epoch = pil_torchvision(a.img_size), iter(range(10 ** 9))
        passes = {'decode-only': lambda: [decode_only(q) for q in pairs],
                  'codseg': lambda: (lambda e: [train[(i, e)] for i in range(len(pairs))])(next(epoch)),
                  'PIL+torchvision': lambda: [pil(q) for q in pairs],
                  'codseg eval': lambda: [ev[i] for i in range(len(pairs))]}
        for f in passes.values(): f()  # warm-up: imports, file cache
        med = side_by_side(passes, a.repeats)
    rate = {k: a.n / v for k, v in med.items()}
    print(f'{a.n} pairs {a.width}x{a.height}, JPEG q95 (mean {kb:.0f} KB) + PNG mask, {a.img_size} px, 1 thread, '
          f'median of {a.repeats} interleaved passes; {machine()}')
    for k, v in rate.items(): print(f'  {k:16s} {v:7.1f} items/s  ({1e3 / v:.1f} ms/item)')
    print(f"loader vs PIL+torchvision: {rate['codseg'] / rate['PIL+torchvision']:.2f}x")
    print(f"loader vs decode-only: {rate['codseg'] / rate['decode-only']:.2f}x")


if __name__ == '__main__':
    main()
