"""Invariants users depend on, each pinned by a mutant the older tests let through: the optimizer really gets the planned
per-group LRs; a mid-epoch resume equals the uninterrupted run; best_model.pth is the best-IoU epoch; validation items are
plain resizes. Public behaviour only: the CLI, `codseg.train.train`, checkpoints, history.csv, `lr-preview --csv`."""
import csv, math, os, re
from pathlib import Path
import cv2, numpy as np, pytest, torch
from codseg.cli import main
from codseg.config import Config

GUIDE = Path(__file__).resolve().parents[1]/'docs'/'lr-scheduler-guide.md'
TINY = ['--dataset-path', 'synthetic', '--synthetic-n', 14, '--synthetic-size', 64, '--img-size', 64,
        '--backbone', 'edgenext_xx_small', '--no-pretrained', '--num-workers', 0, '--device', 'cpu']

@pytest.fixture(scope='module', autouse=True)
def one_thread(tmp_path_factory):
    "A private synthetic-data cache and one torch thread (the CPU is shared; tiny models run faster on one)."
    old, threads = os.environ.get('CODSEG_CACHE'), torch.get_num_threads()
    os.environ['CODSEG_CACHE'] = str(tmp_path_factory.mktemp('cache')); torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if old is None: del os.environ['CODSEG_CACHE']
    else: os.environ['CODSEG_CACHE'] = old

def cli(*args):
    "Run `codseg ARGS` in this process; fail unless it exits 0."
    rc = main([str(a) for a in args])
    assert rc in (0, None), f'codseg {args[0]} exited {rc}'

# ---------------------------------------------------------------- 1. the optimizer's LRs are the plan's

def guide_commands():
    "The guide's four scenario commands, as lists of arguments after `train`."
    blocks = re.findall(r'```bash\n(python train_ultimate.py train.*?)```', GUIDE.read_text(), re.S)
    cmds = [b.replace('\\\n', ' ').split()[3:] for b in blocks if '--dataset-path' in b]
    assert len(cmds) == 4
    return cmds

def shrink(cmd, ckdir, resume=None, epochs=4, stage1=1):
    "The guide's command with the same scheduler flags, on tiny synthetic data for a few epochs."
    out, it = [], iter(cmd)
    swap = {'--checkpoint-dir': ckdir, '--resume-from': resume, '--epochs': epochs, '--stage1-epochs': stage1,
            '--num-experts': 3, '--accumulation-steps': 2}
    drop = {'--dataset-path', '--backbone', '--img-size', '--num-workers'}
    for a in it:
        if a in drop: next(it); continue
        out.append(a)
        if a in swap: next(it); out.append(swap[a])
    return out + [str(a) for a in TINY]

@pytest.fixture
def optimizer_lrs(monkeypatch):
    "Every AdamW step of the run, as {group kind: LR} read from the optimizer's param_groups when it steps."
    steps, step = [], torch.optim.AdamW.step
    def spy(self, *a, **k):
        steps.append({g.get('kind', 'decoder'): g['lr'] for g in self.param_groups})
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, 'step', spy)
    return steps

def test_optimizer_lrs_equal_lr_preview(tmp_path, optimizer_lrs):
    "Both groups' LRs at every optimizer step of the guide's four scenarios equal `lr-preview --csv` (decoder and backbone)."
    s1, s2, s3, s4 = guide_commands()
    ck = tmp_path/'ck'
    runs = [shrink(s1, ck, epochs=5), shrink(s2, ck, ck/'best_model.pth', epochs=6),
            shrink(s3, tmp_path/'opt', epochs=7), shrink(s4, ck, ck/'best_model.pth', epochs=7)]
    for i, args in enumerate(runs):
        cli('lr-preview', *args, '--csv', tmp_path/f'plan{i}.csv')  # before training: the plan the run will follow
        plan = list(csv.DictReader(open(tmp_path/f'plan{i}.csv')))
        optimizer_lrs.clear()
        cli('train', *args)
        assert len(optimizer_lrs) == len(plan) > 0, (i, len(optimizer_lrs), len(plan))
        assert any(float(r['backbone_lr']) > 0 for r in plan) and any(float(r['backbone_lr']) != float(r['lr']) for r in plan)
        for got, row in zip(optimizer_lrs, plan):
            assert set(got) == {'decoder', 'backbone'}, got
            assert got['decoder'] == pytest.approx(float(row['lr']), rel=1e-6, abs=1e-12), (i, row)
            assert got['backbone'] == pytest.approx(float(row['backbone_lr']), rel=1e-6, abs=1e-12), (i, row)
        last = {math.floor(float(r['epoch']) + 1e-9) + 1: r for r in plan}  # epoch number: its last step's row
        ckdir = Path(args[args.index('--checkpoint-dir') + 1])
        hist = [h for h in csv.DictReader(open(ckdir/'history.csv')) if int(h['epoch']) in last]
        assert sorted(int(h['epoch']) for h in hist) == sorted(last), (i, [h['epoch'] for h in hist], sorted(last))
        for h in hist:  # history.csv (and the epoch line) report the LRs at the epoch's last step
            r = last[int(h['epoch'])]
            assert float(h['lr']) == pytest.approx(float(r['lr']), rel=1e-6, abs=1e-12), (i, h, r)
            assert float(h['backbone_lr']) == pytest.approx(float(r['backbone_lr']), rel=1e-6, abs=1e-12), (i, h, r)

# ---------------------------------------------------------------- 2. a mid-epoch resume is the uninterrupted run

RUN = dict(dataset_path='synthetic', synthetic_n=14, synthetic_size=64, img_size=64, backbone='edgenext_xx_small',
           pretrained=False, num_experts=3, num_workers=0, device='cpu', batch_size=2, accumulation_steps=2,
           epochs=3, stage1_epochs=1, lr=2e-3, ema=True, ema_decay=0.9)
quiet = lambda *a, **k: None

def stop_at_step(monkeypatch, n):
    "Send this process SIGTERM (the Kaggle/Ctrl-C stop) just after its `n`-th optimizer step."
    import signal
    count, step = [0], torch.optim.AdamW.step
    def spy(self, *a, **k):
        out = step(self, *a, **k); count[0] += 1
        if count[0] == n: os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(torch.optim.AdamW, 'step', spy)

def same_state(a, b, path=''):
    "Assert two nested checkpoint values (tensors, dicts, lists, numbers) are exactly equal."
    if torch.is_tensor(a): assert torch.is_tensor(b) and torch.equal(a, b), path; return
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a: same_state(a[k], b[k], f'{path}/{k}')
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)): same_state(x, y, f'{path}[{i}]')
        return
    assert a == b, (path, a, b)

def test_mid_epoch_resume_equals_uninterrupted(tmp_path, monkeypatch):
    "Stopped by SIGTERM inside epoch 2 and resumed: weights, optimizer, EMA, global step and history all equal the straight run."
    from codseg.train import train
    straight = train(Config(checkpoint_dir=str(tmp_path/'a'), **RUN), say=quiet)
    assert straight['stopped'] is None and straight['last_epoch'] == 3
    with monkeypatch.context() as m:
        stop_at_step(m, 5)  # 3-4 steps per epoch: inside epoch 2, not at its end
        r = train(Config(checkpoint_dir=str(tmp_path/'b'), **RUN), say=quiet)
    mid = torch.load(tmp_path/'b'/'last.pth', weights_only=True)
    assert r['stopped'] == 'signal' and mid['epoch'] == 1 and 0 < mid['batch'], (r['stopped'], mid['epoch'], mid['batch'])
    assert mid['global_step'] == 5  # steps 0..4 taken: the next optimizer step is 5
    train(Config(checkpoint_dir=str(tmp_path/'b'), resume_from='auto', **RUN), say=quiet)
    a, b = (torch.load(tmp_path/d/'last.pth', weights_only=True) for d in 'ab')
    assert a['global_step'] == b['global_step'] and (a['epoch'], a['batch']) == (b['epoch'], b['batch']) == (3, 0)
    for k in ('model', 'ema', 'optimizer'): same_state(a[k], b[k], k)
    drop = lambda h: [{k: v for k, v in r.items() if k != 'seconds'} for r in h]
    assert drop(a['history']) == drop(b['history']) and len(a['history']) == 3
    ha, hb = (list(csv.DictReader(open(tmp_path/d/'history.csv'))) for d in 'ab')
    assert drop(ha) == drop(hb)

# ---------------------------------------------------------------- 3. best_model.pth is the best-IoU epoch

def test_best_model_is_the_highest_iou_epoch(tmp_path):
    """Six one-epoch sessions (each resumed): best_model.pth holds the epoch of the highest validation IoU in history.csv
    and exactly that epoch's weights, although the training loss is lowest at another epoch."""
    from codseg.train import train
    cfg = {**RUN, 'epochs': 6, 'stage1_epochs': 2, 'lr': 2e-2, 'ema': False, 'checkpoint_dir': str(tmp_path)}
    weights = {}
    for e in range(1, 7):
        train(Config(resume_from='auto' if e > 1 else None, stop_after=1, **cfg), say=quiet)
        weights[e] = torch.load(tmp_path/'last.pth', weights_only=True)['model']
    hist = list(csv.DictReader(open(tmp_path/'history.csv')))
    assert [int(r['epoch']) for r in hist] == list(range(1, 7))
    best = max(hist, key=lambda r: float(r['iou']))
    low = min(hist, key=lambda r: float(r['loss']))
    assert best['epoch'] != low['epoch'] and best['epoch'] != '6', 'this run no longer tells best IoU from lowest loss or last'
    ck = torch.load(tmp_path/'best_model.pth', weights_only=True)
    assert ck['best_epoch'] == int(best['epoch']) and ck['best_iou'] == pytest.approx(float(best['iou']), abs=1e-12)
    assert ck['history'][-1]['epoch'] == int(best['epoch'])
    same_state(ck['model'], weights[int(best['epoch'])], 'model')

# ---------------------------------------------------------------- 4. validation items are plain resizes

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

def test_validation_items_are_plain_resizes(tmp_path):
    "Every validation item, in any epoch, is the source image resized (cv2 bilinear) and normalised, its mask resized."
    from codseg.data import build_data
    rng = np.random.default_rng(0)
    src = {}
    for split in ('train', 'val'):
        for i, (h, w) in enumerate([(150, 97), (61, 200), (96, 96), (123, 77)]):
            name = f'{split}{i}'
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            yy, xx = np.mgrid[:h, :w]
            mask = ((yy - h / 2) ** 2 / (h / 3) ** 2 + (xx - w / 3) ** 2 / (w / 4) ** 2 < 1).astype(np.uint8)
            for d in ('images', 'masks'): (tmp_path/split/d).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path/split/'images'/f'{name}.png'), img[..., ::-1])  # PNG: read back exactly (RGB)
            cv2.imwrite(str(tmp_path/split/'masks'/f'{name}.png'), mask * 255)
            src[name] = img, mask
    s = 64
    cfg = Config(dataset_path=str(tmp_path/'train'), val_path=str(tmp_path/'val'), img_size=s, num_workers=0)
    val = build_data(cfg, MEAN, STD).val_ds
    assert len(val) == 4
    for i in range(len(val)):
        for item in (val[i], val[(i, 5)], val[(i, 5)]):
            img, mask = src[item['name']]
            want = (cv2.resize(img, (s, s), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255 - MEAN) / STD
            got = item['image'].numpy().transpose(1, 2, 0)
            assert got.shape == (s, s, 3) and np.abs(got - want).max() < 1e-4, (item['name'], np.abs(got - want).max())
            m = cv2.resize(mask, (s, s), interpolation=cv2.INTER_NEAREST)
            assert item['mask'].shape == (1, s, s) and (item['mask'][0].numpy() == m).mean() > 0.98, item['name']
            assert item['size'].tolist() == list(img.shape[:2])

# ---------------------------------------------------------------- more checks by hand (mutants the notebooks let through)

def put(img_dir, mask_dir, name, size=20):
    "A random PNG image and a mask with a square, `size` x `size`."
    for d in (img_dir, mask_dir): d.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(img_dir/f'{name}.png'), np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    m = np.zeros((size, size), np.uint8); m[5:12, 5:12] = 255
    cv2.imwrite(str(mask_dir/f'{name}.png'), m)

def test_two_roots_keep_one_pair_per_training_name(tmp_path):
    "A folder holding two datasets whose training images share a name: the name is used once and the clash reported."
    from codseg.roles import discover
    top = tmp_path/'data'  # not pytest's folder itself: its name starts with 'test', which names a test split
    for root, names in (('A', ['x', 'y']), ('B', ['x', 'z'])):
        for n in names: put(top/root/'images', top/root/'masks', n)
    found = discover(top)
    assert sorted(p.name for p in found.train) == ['x', 'y', 'z']
    assert any('repeat names' in p for p in found.problems), found.problems

def test_shrunk_masks_keep_pixels_at_least_half_object(tmp_path):
    "A JPEG decoded 8x smaller for a small img_size: its mask is the 8x8 block average, object where at least half is."
    from codseg.data import SegDataset, eval_transform
    from codseg.layout import Pair
    img = cv2.resize(np.random.default_rng(1).integers(0, 256, (10, 10, 3), dtype=np.uint8), (800, 800))
    mask = np.zeros((800, 800), np.uint8)
    mask[13:53, 13:53] = 1  # edge blocks 3/8 and 5/8 covered: products never exactly 1/2
    mask[200:600, 401] = 1  # a one-pixel line: 1/8 of each block, gone when shrunk
    cv2.imwrite(str(tmp_path/'a.jpg'), img, [cv2.IMWRITE_JPEG_QUALITY, 95]); cv2.imwrite(str(tmp_path/'a.png'), mask * 255)
    ds = SegDataset([Pair(tmp_path/'a.jpg', tmp_path/'a.png', 'a')], eval_transform(64, MEAN, STD))
    im, m, size = ds.load_small(0)
    hand = (mask.reshape(100, 8, 100, 8).mean((1, 3)) >= 0.5).astype(np.uint8)
    assert size == (800, 800) and im.shape[:2] == (100, 100) and np.array_equal(m, hand)

def test_structure_loss_by_hand():
    "F3Net's structure loss (weights 1 + 5|avgpool31(mask) - mask|, weighted BCE + weighted IoU) computed by hand."
    from codseg.losses import CODLoss
    rng = np.random.default_rng(0)
    mask = np.zeros((2, 1, 12, 10)); mask[0, 0, 2:8, 3:9] = 1; mask[1, 0, 5:, :4] = 1
    logits = rng.normal(0, 2, mask.shape)
    pad = np.pad(mask, ((0, 0), (0, 0), (15, 15), (15, 15)))  # zero padding, counted in the 31x31 mean
    pool = np.array([[[[pad[b, 0, i:i + 31, j:j + 31].mean() for j in range(10)] for i in range(12)]] for b in range(2)])
    w = 1 + 5 * np.abs(pool - mask)
    p = 1 / (1 + np.exp(-logits))
    bce = -(mask * np.log(p) + (1 - mask) * np.log(1 - p))
    wbce = (w * bce).sum((2, 3)) / w.sum((2, 3))
    inter, union = (w * p * mask).sum((2, 3)), (w * (p + mask)).sum((2, 3))
    hand = (wbce + 1 - (inter + 1) / (union - inter + 1)).mean()
    t = lambda a: torch.tensor(a, dtype=torch.float32)
    loss, parts = CODLoss('structure', aux_weight=0.5, balance_weight=0.01)({'logits': t(logits)}, t(mask))
    assert float(parts['main']) == pytest.approx(hand, rel=1e-5) and float(loss) == pytest.approx(hand, rel=1e-5)
    aux = {'logits': t(logits), 'aux': [t(logits[..., ::2, ::2].copy())], 'route': torch.tensor([[1.0, 0.0], [1.0, 0.0]])}  # balance 2
    loss, parts = CODLoss('structure', aux_weight=0.5, balance_weight=0.01)(aux, t(mask))
    assert float(loss) == pytest.approx(float(parts['main']) + 0.5 * float(parts['aux']) + 0.02, rel=1e-6)

def test_resume_auto_takes_the_newest_last_pth(tmp_path):
    "--resume-from auto: the newest last.pth under --checkpoint-dir or the Kaggle input folder; None when there is none."
    from codseg.train import find_resume
    ck, kin = tmp_path/'ck', tmp_path/'input'
    cfg = Config(checkpoint_dir=str(ck), resume_from='auto')
    assert find_resume(cfg, kaggle_input=str(kin)) is None
    files = [ck/'last.pth', kin/'session1'/'out'/'last.pth', kin/'session2'/'last.pth']
    for i, f in enumerate(files):
        f.parent.mkdir(parents=True, exist_ok=True); f.write_bytes(b'x'); os.utime(f, (1000 + i, 1000 + i))
    assert find_resume(cfg, kaggle_input=str(kin)) == files[2]
    os.utime(files[0], (2000, 2000))
    assert find_resume(cfg, kaggle_input=str(kin)) == files[0]
    assert find_resume(Config(checkpoint_dir=str(ck), resume_from=str(files[1])), kaggle_input=str(kin)) == files[1]

def test_ema_starts_from_the_trained_weights(tmp_path, monkeypatch):
    "With --ema, the EMA is not dragged by the random initial weights: after the first optimizer step it equals the model."
    from codseg.train import train
    stop_at_step(monkeypatch, 1)
    r = train(Config(checkpoint_dir=str(tmp_path), **{**RUN, 'ema_decay': 0.999}), say=quiet)
    ck = torch.load(tmp_path/'last.pth', weights_only=True)
    assert r['stopped'] == 'signal' and ck['ema'] is not None
    assert ck['global_step'] == 1 and (ck['epoch'], ck['batch']) == (0, 2)  # one step (2 batches at accumulation 2) done
    same_state({k.removeprefix('module.'): v for k, v in ck['ema'].items()}, ck['model'], 'ema')  # timm's EMA wraps the model

# ---------------------------------------------------------------- session end: workers and exit status

def test_worker_start_leaves_group_signals_to_the_main_process():
    "A DataLoader worker (quiet_worker, as make_learner installs it) leaves its parent's process group and ignores SIGINT."
    import subprocess, sys
    code = ("import os, signal\nfrom codseg.train import quiet_worker\nseen = []\n"
            "quiet_worker(seen.append, 3)\n"
            "print(os.getpgid(0) == os.getpid() != os.getppid(), signal.getsignal(signal.SIGINT) is signal.SIG_IGN, seen)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, start_new_session=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split('\n')[-2] == 'True True [3]', r.stdout

@pytest.mark.parametrize('signum', [2, 15])
def test_exit_status_after_a_signal_stop_is_128_plus_n(monkeypatch, signum):
    "`codseg train` stopped by signal N (after its resumable save) exits 128+N; a finished run exits 0."
    import codseg.train as T
    monkeypatch.setattr(T, 'train', lambda cfg, **k: {'signal': signum, 'stopped': 'signal'})
    assert T.train_cli(['--dataset-path', 'synthetic']) == 128 + signum
    monkeypatch.setattr(T, 'train', lambda cfg, **k: {'signal': 0, 'stopped': None})
    assert T.train_cli(['--dataset-path', 'synthetic']) == 0
