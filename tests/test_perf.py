"""Functional checks of the data-loading speed-ups (never timings): reduced JPEG decoding, the resized cache, and that
the benchmark scripts still run and print their figure."""
import os, re, subprocess, sys, warnings
from dataclasses import replace
from pathlib import Path
import cv2, numpy as np, pytest, torch
from codseg.config import Config
from codseg.data import SegDataset, build_data, eval_transform, train_transform
from codseg.image import DataError, read_image, jpeg_size, read_bytes, reduce_factor
from codseg.cache import input_scale
from codseg.layout import Pair
from codseg.synthetic import make_scene

ROOT = Path(__file__).resolve().parents[1]
CAMO = Path(__file__).resolve().parent/'fixtures'/'CAMO-sample'  # three real CAMO pairs
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BENCH = ROOT/"benchmarks"
sys.path.insert(0, str(BENCH))


def write_cod10k(root: Path, n: int, w=400, h=300, test=2) -> Path:
    "A COD10K-v3 layout of `n` training and `test` test JPEG scenes (quality 95) with PNG masks."
    rng = np.random.default_rng(0)
    for split, k in (('Train', n), ('Test', test)):
        (root/split/'Image').mkdir(parents=True); (root/split/'GT_Object').mkdir(parents=True)
        for i in range(k):
            img, mask = make_scene(rng, max(w, h))
            name = f'COD10K-CAM-1-Aquatic-1-Fish-{split}{i:04d}'
            cv2.imwrite(str(root/split/'Image'/f'{name}.jpg'), img[:h, :w, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(root/split/'GT_Object'/f'{name}.png'), mask[:h, :w])
    return root


def snapshot(root: Path) -> dict:
    "Every path under `root` with its size and mtime."
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob('*'))}


@pytest.fixture(scope='module')
def cod(tmp_path_factory):
    return write_cod10k(tmp_path_factory.mktemp('cod')/'COD10K-v3', 12)


def test_reduced_decoding_sizes(tmp_path):
    img = cv2.resize(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8), (1000, 750), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(tmp_path/'a.jpg'), img, [cv2.IMWRITE_JPEG_QUALITY, 95]); cv2.imwrite(str(tmp_path/'a.png'), (img[..., 0] > 128) * np.uint8(255))
    assert [read_image(tmp_path/'a.jpg', f).shape[:2] for f in (1, 2, 4, 8)] == [(750, 1000), (375, 500), (188, 250), (94, 125)]
    assert jpeg_size(read_bytes(tmp_path/'a.jpg')) == (750, 1000)
    pair = [Pair(tmp_path/'a.jpg', tmp_path/'a.png', 'a')]
    for tf, want in ((eval_transform(96, MEAN, STD), (188, 250)), (train_transform(96, MEAN, STD), (188, 250)),
                     (eval_transform(400, MEAN, STD), (750, 1000)), (train_transform(200, MEAN, STD), (375, 500))):
        ds = SegDataset(pair, tf)
        im, m, size = ds.load_small(0)
        assert im.shape[:2] == want and m.shape == want and size == (750, 1000) and set(np.unique(m)) <= {0, 1}
        it = ds[0]
        assert it['size'].tolist() == [750, 1000] and it['image'].shape[1:] == it['mask'].shape[1:]
    # the largest reduction that never makes the transform enlarge (its smallest crop, or the resized sides)
    for h, w in ((750, 1000), (3000, 4000), (480, 2000)):
        for tf in (eval_transform(384, MEAN, STD), train_transform(384, MEAN, STD)):
            k, f = input_scale(tf, h, w), reduce_factor(h, w, input_scale(tf, h, w))
            fits = lambda f: -(-h // f) >= k * h - 1e-6 and -(-w // f) >= k * w - 1e-6
            assert fits(f) and (f == 8 or not fits(2 * f))


def test_reduced_decoding_on_real_camo_images():
    pairs = [Pair(p, CAMO/'GT'/f'{p.stem}.png', p.stem) for p in sorted((CAMO/'Images'/'Test').glob('*.jpg'))]
    ds = SegDataset(pairs, eval_transform(128, MEAN, STD))
    for i, p in enumerate(pairs):
        h, w = cv2.imread(str(p.image)).shape[:2]
        im, m, size = ds.load_small(i)
        f = reduce_factor(h, w, max(128 / h, 128 / w))
        assert size == (h, w) and im.shape[:2] == m.shape == (-(-h // f), -(-w // f)) and f >= 2
        # closer to the anti-aliased picture (area-averaged from full size) than a bilinear resize from full size is
        tf, img = eval_transform(128, MEAN, STD), read_image(p.image)
        ideal = torch.from_numpy(tf(image=cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA))['image'].transpose(2, 0, 1))
        full = tf(image=img, mask=ds.load(i)[1])
        it = ds[i]
        assert (it['image'] - ideal).abs().mean() <= (torch.from_numpy(full['image'].transpose(2, 0, 1)) - ideal).abs().mean()
        assert (it['mask'][0].numpy() == full['mask']).mean() > 0.97


def test_cache_built_once_reused_invalidated(cod, tmp_path):
    inputs, ck = snapshot(cod), tmp_path/'cache'
    cfg = Config(dataset_path=str(cod), img_size=96, cache_dir=str(ck), num_workers=2)
    first = build_data(cfg, MEAN, STD)
    folder = ck/'codseg-v1'/'96px'
    entries = snapshot(folder)
    assert len(entries) == 12 and '12 of 12 pairs (12 made now)' in first.summary
    assert all(e is not None for ds in (first.train_ds, first.val_ds) for e in ds.entries)
    second = build_data(cfg, MEAN, STD)  # a later session: reads, makes nothing, rewrites nothing
    assert '12 of 12 pairs (0 made now)' in second.summary and snapshot(folder) == entries
    src = first.train_ds.pairs[0].image
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10 ** 9))  # a changed file: a new entry
    third = build_data(cfg, MEAN, STD)
    assert '(1 made now)' in third.summary and len(snapshot(folder)) == 13
    inputs[src] = (src.stat().st_size, src.stat().st_mtime_ns)
    other = build_data(replace(cfg, img_size=64), MEAN, STD)  # another size: another folder, all new
    assert '12 of 12 pairs (12 made now); other sizes there: 96px' in other.summary
    assert len(snapshot(ck/'codseg-v1'/'64px')) == 12 and snapshot(folder) != {}
    assert snapshot(cod) == inputs  # nothing written into the dataset


def test_cache_refuses_inputs_and_survives_unwritable(cod, tmp_path):
    with pytest.raises(DataError, match='never writes into its inputs'):
        build_data(Config(dataset_path=str(cod), cache_dir=str(cod/'Train'/'cache')), MEAN, STD)
    (tmp_path/'file').write_text('')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        d = build_data(Config(dataset_path=str(cod), img_size=64, cache_dir=str(tmp_path/'file')), MEAN, STD)
    assert any('cannot be written' in str(x.message) for x in w) and ': 0 of 12 pairs (0 made now)' in d.summary
    assert d.train_ds[0]['image'].shape == (3, 64, 64)


def test_items_keep_their_contract_with_the_cache(cod, tmp_path):
    cfg = Config(dataset_path=str(cod), img_size=96, num_workers=0)
    plain, cached = build_data(cfg, MEAN, STD), build_data(replace(cfg, cache_dir=str(tmp_path/'c')), MEAN, STD)
    shape = lambda it: {k: (tuple(v.shape), v.dtype) if torch.is_tensor(v) else v for k, v in it.items() if k != 'size'}
    for a_ds, c_ds in ((plain.train_ds, cached.train_ds), (plain.val_ds, cached.val_ds)):
        for i in range(len(a_ds)):
            a, c = a_ds[(i, 3)], c_ds[(i, 3)]
            assert shape(a) == shape(c) and a['size'].tolist() == c['size'].tolist() == [300, 400]
            assert set(c['mask'].unique().tolist()) <= {0.0, 1.0}
    for i in range(len(plain.val_ds)):  # evaluation items are deterministic: the pixels agree up to resampling
        a, c = plain.val_ds[i], cached.val_ds[i]
        assert (a['image'] - c['image']).abs().mean() < 0.05 and (a['mask'] == c['mask']).float().mean() > 0.97
    from codseg.data import make_loader
    b = next(iter(make_loader(cached.train_ds, 4, train=True, num_workers=2, seed=0)))  # workers read the entries
    assert b['image'].shape == (4, 3, 96, 96) and b['size'].tolist()[0] == [300, 400]


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def figure(pattern, line):
    "The ratio in benchmark line `line` (a float), which must match `pattern` with the ratio as group 1."
    m = re.fullmatch(pattern, line)
    assert m, line
    return float(m[1])

def test_loader_benchmark_smoke(capsys):
    """Smoke test only (no floor: at this tiny size the figure swings from 0.04x to 1.2x with the load on a shared CPU):
    loader_speed runs and prints its figure."""
    import loader_speed
    loader_speed.main(['--n', '2', '--width', '320', '--height', '240', '--img-size', '64', '--repeats', '1'])
    assert re.fullmatch(r'loader vs decode-only: \d+\.\d+x', last_line(capsys))

def test_cache_benchmark_keeps_a_floor(capsys):
    """The cache speedup at a tiny size stays above 1.5x, half the target (3x at 1 MP): a cache that is not used reads
    at ~1x. It measures ~45x on a quiet 2-core container but fell to 3.2x in one CI run beside other tests."""
    import cache_speed
    cache_speed.main(['--n', '2', '--width', '320', '--height', '240', '--img-size', '64', '--repeats', '1'])
    assert figure(r'cache speedup: (\d+\.\d)x', last_line(capsys)) >= 1.5

def test_memory_benchmark_smoke():
    "Smoke test only (no floor: at 64 px and batch 1 checkpointing saves nothing): memory_peak runs and prints its figure."
    # memory_peak re-runs itself with glibc's mmap threshold lowered, so RSS shows each step's allocations: run it
    # as a script (in this long-lived test process freed heap is reused and an RSS delta means nothing)
    out = subprocess.run([sys.executable, str(BENCH/'memory_peak.py'), '--backbones', 'edgenext_xx_small', '--batches', '1',
                          '--img-size', '64', '--device', 'cpu'], capture_output=True, text=True, cwd=BENCH, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r'edgenext_xx_small\s+batch 1:\s+(\d+) MB, with checkpointing\s+(\d+) MB', out.stdout)
    assert m and int(m[1]) > 0 and int(m[2]) > 0, out.stdout
    assert re.fullmatch(r'grad checkpointing memory \(edgenext_xx_small, batch 1\): \d+\.\d\dx', out.stdout.strip().splitlines()[-1])


def test_trainer_overhead_keeps_a_floor(capsys):
    "At most one host read per step, and the learner within 3x of a bare loop (it measures 0.95-1.0x: a 10x slip fails)."
    import trainer_overhead
    trainer_overhead.main(['--img-size', '64', '--batch', '2', '--batches', '2', '--repeats', '1', '--device', 'cpu'])
    m = re.fullmatch(r'trainer overhead: (\d+\.\d+)x \(host reads per step: (\d+\.\d+)\)', last_line(capsys))
    assert m and float(m[2]) <= 1.0 and float(m[1]) >= 0.33, m


FORK_SCRIPT = '''
import tempfile, pathlib, numpy as np, cv2
from concurrent.futures import ThreadPoolExecutor
from codseg.data import SegDataset, make_loader, eval_transform
from codseg.layout import Pair
td = pathlib.Path(tempfile.mkdtemp())
for i in range(4):
    cv2.imwrite(str(td/f'{i}.jpg'), np.full((60, 80, 3), 20 * i, np.uint8)); cv2.imwrite(str(td/f'{i}.png'), np.zeros((60, 80), np.uint8))
ds = SegDataset([Pair(td/f'{i}.jpg', td/f'{i}.png', str(i)) for i in range(4)], eval_transform(32, (0.5,) * 3, (0.2,) * 3))
big = np.zeros((1500, 1500, 3), np.uint8)
for _ in range(6):  # the parent uses OpenCV's thread pool from several threads, then forks workers
    with ThreadPoolExecutor(2) as ex: list(ex.map(lambda _: cv2.resize(big, (700, 600), interpolation=cv2.INTER_AREA), range(4)))
    assert len(list(make_loader(ds, 2, train=True, num_workers=2, seed=0))) == 2
print('ok')
'''


def test_workers_start_after_the_parent_used_opencv_threads():
    import subprocess
    r = subprocess.run([sys.executable, '-c', FORK_SCRIPT], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr[-2000:]


def test_cache_shares_under_ddp(cod, tmp_path):
    "Processes filling one cache folder make every entry once: here one after another, so the first makes them all."
    from codseg.cache import fill_cache, use_cache
    ds = build_data(Config(dataset_path=str(cod), img_size=64), MEAN, STD).train_ds
    made = [fill_cache(ds, tmp_path, workers=1, rank=r, world=3) for r in range(3)]
    assert made == [len(ds), 0, 0] and use_cache(ds, tmp_path, 1) == len(ds)
    assert fill_cache(ds, tmp_path, workers=1, rank=0, world=3) == 0
