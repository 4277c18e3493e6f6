"End to end: `codseg evaluate` against PySODMetrics by hand, `codseg predict` on odd sizes (find-lr: tests/test_findlr.py)."
import csv, hashlib, json, os, subprocess, sys
from pathlib import Path
import cv2, numpy as np, pytest, torch
import py_sod_metrics as M

CAMO = Path(__file__).resolve().parent/'fixtures'/'CAMO-sample'  # three real CAMO pairs
from conftest import TINY  # the shared tiny settings
from conftest import tree_hash

def codseg(*args):
    "Run `python -m codseg ARGS` (one intra-op thread); returns stdout, failing with its output when the exit status is not 0."
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'codseg', *map(str, args)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, f'codseg {args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r.stdout

pytestmark = pytest.mark.usefixtures('private_cache')

def put_pair(img_dir, mask_dir, name, h, w, seed, empty=False):
    "A noisy image of h x w with a darker ellipse, and its mask (0/255; all 0 when `empty`)."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    m = (((yy - h * rng.uniform(0.3, 0.7)) / (h / 4)) ** 2 + ((xx - w * rng.uniform(0.3, 0.7)) / (w / 5)) ** 2 < 1)
    img = rng.integers(60, 200, (h, w, 3), dtype=np.uint8); img[m] -= 40
    for d in (img_dir, mask_dir): d.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(img_dir/f'{name}.jpg'), img)
    cv2.imwrite(str(mask_dir/f'{name}.png'), np.zeros((h, w), np.uint8) if empty else m.astype(np.uint8) * 255)

def by_hand(maps: Path, gts: Path) -> dict:
    "The protocol applied by hand: PySODMetrics on the saved PNGs and the masks as read from disk; IoU/Dice at 0.5."
    sm, em, wfm, mae, iou, dice = M.Smeasure(), M.Emeasure(), M.WeightedFmeasure(), M.MAE(), [], []
    for g in sorted(gts.iterdir()):
        gt = cv2.imread(str(g), cv2.IMREAD_GRAYSCALE)
        pred = cv2.imread(str(maps/f'{g.stem}.png'), cv2.IMREAD_GRAYSCALE)
        assert pred is not None and pred.shape == gt.shape, f'{g.stem}: map missing or not at the mask size'
        for m in (sm, em, wfm, mae): m.step(pred=pred, gt=gt)
        p, t = pred >= 128, gt > 128  # probability > 0.5 <=> uint8 value >= 128
        iou.append((p & t).sum() / (p | t).sum() if (p | t).any() else 1.0)
        dice.append(2 * (p & t).sum() / (p.sum() + t.sum()) if (p | t).any() else 1.0)
    e = em.get_results()['em']
    return dict(images=len(iou), Sm=sm.get_results()['sm'], meanEm=e['curve'].mean(), adpEm=e['adp'], maxEm=e['curve'].max(),
                wFm=wfm.get_results()['wfm'], MAE=mae.get_results()['mae'], IoU=np.mean(iou), Dice=np.mean(dice))

def assert_same(row: dict, hand: dict):
    assert row['images'] == hand['images']
    for k, v in hand.items(): assert abs(row[k] - v) <= 1e-6, f"{row['dataset']} {k}: evaluate {row[k]} != by hand {v}"

# ---------------------------------------------------------------- evaluate

def test_evaluate_equals_pysodmetrics_by_hand(ckpt, tmp_path):
    "Two test sets of odd-sized images (one with an empty mask): the CLI's CSV/JSON equal PySODMetrics on the saved maps."
    pack = tmp_path/'pack'
    sizes = [(61, 47), (33, 90), (50, 50), (97, 13)]
    for i, (h, w) in enumerate(sizes):
        put_pair(pack/'TestDataset'/'SETA'/'Imgs', pack/'TestDataset'/'SETA'/'GT', f'a{i}', h, w, i)
        put_pair(pack/'TestDataset'/'SETB'/'Imgs', pack/'TestDataset'/'SETB'/'GT', f'b{i}', w, h, 10 + i, empty=i == 3)
    before = tree_hash(pack)
    out = codseg('evaluate', '--checkpoint', ckpt, '--dataset-path', pack, '--save-predictions', tmp_path/'maps',
                 '--output', tmp_path/'out', '--num-workers', 0, '--device', 'cpu')
    assert 'SETA' in out and 'SETB' in out and 'eval_best_model.csv' in out
    rows = json.loads((tmp_path/'out'/'eval_best_model.json').read_text())['results']
    assert [r['dataset'] for r in rows] == ['SETA', 'SETB']
    for r in rows: assert_same(r, by_hand(tmp_path/'maps'/r['dataset'], pack/'TestDataset'/r['dataset']/'GT'))
    with open(tmp_path/'out'/'eval_best_model.csv') as f: table = list(csv.DictReader(f))
    for r, c in zip(rows, table):
        assert c['dataset'] == r['dataset'] and all(abs(float(c[k]) - r[k]) <= 1e-12 for k in ('Sm', 'MAE', 'maxEm', 'Dice'))
    assert tree_hash(pack) == before, 'evaluate wrote into the dataset folder'

def test_evaluate_camo_fixture(ckpt, tmp_path):
    "The real CAMO sample (JPEGs of 632x420, 589x617, 470x314): maps at each mask's size, numbers equal PySODMetrics by hand."
    from codseg.evaluate import evaluate
    before = tree_hash(CAMO)
    rows = evaluate(ckpt, CAMO, output=tmp_path, save_predictions=tmp_path/'maps', device='cpu', num_workers=0, say=lambda *a: None)
    assert [r['dataset'] for r in rows] == ['CAMO']
    assert_same(rows[0], by_hand(tmp_path/'maps', CAMO/'GT'))
    assert cv2.imread(str(tmp_path/'maps'/'camourflage_00064.png'), cv2.IMREAD_UNCHANGED).shape == (617, 589)
    assert tree_hash(CAMO) == before

def test_evaluate_noncam_tta_and_defaults(ckpt, tmp_path):
    "COD10K NonCAM images are left out unless --include-noncam; --tta writes its own file; default output beside the checkpoint."
    from codseg.evaluate import evaluate
    root = tmp_path/'COD10K-v3'
    put_pair(root/'Train'/'Image', root/'Train'/'GT_Object', 'COD10K-CAM-1-Aquatic-1-Fish-1', 40, 30, 0)
    for i, n in enumerate(['COD10K-CAM-2-Terrestrial-1-Cat-4', 'COD10K-CAM-3-Flying-1-Bird-7', 'COD10K-NonCAM-5-Background-1-Sky-9']):
        put_pair(root/'Test'/'Image', root/'Test'/'GT_Object', n, 45, 37, i, empty='NonCAM' in n)
    quiet = dict(device='cpu', num_workers=0, say=lambda *a: None)
    assert [(r['dataset'], r['images']) for r in evaluate(ckpt, root, **quiet)] == [('COD10K', 2)]
    assert (ckpt.parent/'eval_best_model.csv').is_file() and (ckpt.parent/'eval_best_model.json').is_file()
    assert evaluate(ckpt, root, output=tmp_path/'o', include_noncam=True, **quiet)[0]['images'] == 3
    plain = evaluate(ckpt, root, output=tmp_path/'o', **quiet)[0]
    tta = evaluate(ckpt, root, output=tmp_path/'o', tta=True, **quiet)[0]
    assert (tmp_path/'o'/'eval_best_model_tta.json').is_file() and tta['images'] == 2 and tta['MAE'] != plain['MAE']
    with pytest.raises(ValueError, match='codseg never writes into its inputs'): evaluate(ckpt, root, output=root/'res', **quiet)

def test_tta_is_the_mean_of_flipped_and_scaled_views(ckpt):
    """--tta's probabilities equal, by hand, the mean of sigmoid(model) over the image and its horizontal mirror at
    0.75, 1 and 1.25 times its size (sides rounded to a multiple of 32, at least 32), each unflipped and resized back."""
    import torch.nn.functional as F
    from codseg.evaluate import predict_probs
    from codseg.train import model_from_checkpoint
    model, _ = model_from_checkpoint(ckpt)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    views = []
    with torch.inference_mode():
        for s in (0.75, 1.0, 1.25):
            size = [max(32, round(d * s / 32) * 32) for d in (64, 96)]
            v = F.interpolate(x, size=size, mode='bilinear', align_corners=False) if s != 1 else x
            for flip in (False, True):
                y = model(v.flip(-1) if flip else v)['logits'].float()
                y = y.flip(-1) if flip else y
                views.append(F.interpolate(y, size=(64, 96), mode='bilinear', align_corners=False).sigmoid())
        hand = torch.stack(views).mean(0)
        got, plain = predict_probs(model, x, tta=True), predict_probs(model, x)
    assert got.shape == (2, 1, 64, 96) and torch.allclose(got, hand, atol=1e-6), (got - hand).abs().max()
    assert torch.allclose(plain, model(x)['logits'].float().sigmoid(), atol=1e-6)
    assert (got - plain).abs().max() > 1e-3  # the views really differ: the comparison above can fail

def test_evaluate_bad_input_names_the_fix(ckpt, tmp_path):
    from codseg.cli import main
    put_pair(tmp_path/'d'/'images', tmp_path/'d'/'masks', 'x', 20, 20, 0)
    (tmp_path/'d'/'masks'/'x.png').unlink()
    assert main(['evaluate', '--checkpoint', str(tmp_path/'missing.pth'), '--dataset-path', str(tmp_path/'d')]) == 2
    from codseg.evaluate import evaluate
    with pytest.raises(ValueError, match='--skip-bad'): evaluate(ckpt, tmp_path/'d', device='cpu', num_workers=0)

# ---------------------------------------------------------------- predict

def test_predict_keeps_each_images_size(ckpt, tmp_path):
    "Maps (and masks, overlays) have exactly each input's size, for odd sizes and aspect ratios; values 0-255."
    from codseg.cli import main
    ins = tmp_path/'in'; ins.mkdir()
    sizes = {'odd': (617, 589), 'odd_t': (589, 617), 'strip': (9, 301), 'one': (1, 1), 'UPPER': (128, 77)}
    rng = np.random.default_rng(0)
    for n, (h, w) in sizes.items(): cv2.imwrite(str(ins/f"{n}{'.JPG' if n == 'UPPER' else '.png'}"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for f in (CAMO/'Images'/'Test').iterdir(): (ins/f.name).write_bytes(f.read_bytes()); sizes[f.stem] = cv2.imread(str(f)).shape[:2]
    before = tree_hash(ins)
    assert main(['predict', '--checkpoint', str(ckpt), '--input', str(ins), '--output', str(tmp_path/'out'), '--masks', '--overlays',
                 '--device', 'cpu', '--num-workers', '0']) == 0
    assert sorted(p.stem for p in (tmp_path/'out').glob('*.png')) == sorted(sizes)
    for n, hw in sizes.items():
        a = cv2.imread(str(tmp_path/'out'/f'{n}.png'), cv2.IMREAD_UNCHANGED)
        assert a.dtype == np.uint8 and a.shape == hw, (n, a.shape, hw)
        assert hw == (1, 1) or len(np.unique(a)) > 1, f'{n}: a constant map'  # uint8: 0-255 by type
        assert set(np.unique(cv2.imread(str(tmp_path/'out'/'masks'/f'{n}.png'), cv2.IMREAD_UNCHANGED))) <= {0, 255}
        assert cv2.imread(str(tmp_path/'out'/'overlays'/f'{n}.jpg')).shape[:2] == hw
    assert tree_hash(ins) == before
    assert main(['predict', '--checkpoint', str(ckpt), '--input', str(ins), '--output', str(ins/'maps')]) == 2
    assert main(['predict', '--checkpoint', str(ckpt), '--input', str(ins/'odd.png'), '--output', str(tmp_path/'one'),
                 '--device', 'cpu', '--num-workers', '0']) == 0
    assert cv2.imread(str(tmp_path/'one'/'odd.png'), cv2.IMREAD_UNCHANGED).shape == (617, 589)
