"""Released prediction maps scored by codseg.maps equal PySODMetrics applied directly; 1 worker = N workers; the cache
reads back what it stored and scores only what changed; a bad folder is one line with exit status 2; a checkpoint's
row equals its saved maps' row; the report's files."""
import json, re, warnings
from pathlib import Path
import cv2, numpy as np, pytest
import py_sod_metrics as M
import codseg.maps as maps
from codseg.errors import UsageError, describe
from codseg.roles import discover
from codseg.maps import load_method, match_maps, parse_pred_dir, score_arrays, score_method
from codseg.metrics import CURVE_KEYS, FULL_METRICS

FORMS = ('grey8', 'grey16', 'rgb', 'rgba', 'half', 'larger', 'jpeg-free-bmp')  # how each map is written, in turn
COD = ['COD10K-CAM-1-Aquatic-1-BatFish-3', 'COD10K-CAM-2-Terrestrial-23-Cat-1', 'COD10K-CAM-3-Flying-53-Bird-3',
       'COD10K-CAM-4-Amphibian-2-Frog-12', 'COD10K-CAM-1-Aquatic-13-Pipefish-5', 'COD10K-NonCAM-1-Aquatic-1-Fish-1',
       'COD10K-CAM-2-Terrestrial-4-Ant-9']
CAMO = [f'camourflage_{i:05d}' for i in range(1, 9)]
CHAMELEON = [f'animal-{i}' for i in range(1, 6)]
SIZES = {'COD10K': (37, 53), 'CAMO': (48, 40), 'CHAMELEON': (29, 61)}


def mask(rng, h, w) -> np.ndarray:
    "A blob or two, 0/255."
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 3)):
        m |= (yy - rng.uniform(0, h)) ** 2 / rng.uniform(20, 150) + (xx - rng.uniform(0, w)) ** 2 / rng.uniform(20, 150) < 1
    return m.astype(np.uint8) * 255


def write_dataset(root: Path, seed=0) -> dict:
    "TestDataset/{COD10K,CAMO,CHAMELEON}/{Imgs,GT} (COD10K with one NonCAM image, no mask); the masks by stem."
    rng, gts = np.random.default_rng(seed), {}
    for s, stems in (('COD10K', COD), ('CAMO', CAMO), ('CHAMELEON', CHAMELEON)):
        for sub in ('Imgs', 'GT'): (root/s/sub).mkdir(parents=True)
        for j, n in enumerate(stems):
            h, w = SIZES[s][0] + j, SIZES[s][1] - j  # sizes differ within a set too
            cv2.imwrite(str(root/s/'Imgs'/f'{n}.jpg'), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            if 'NonCAM' in n: gts[n] = np.zeros((h, w), np.uint8)
            else: cv2.imwrite(str(root/s/'GT'/f'{n}.png'), gts.setdefault(n, mask(rng, h, w)))
    return gts


def map_for(rng, gt: np.ndarray, structured: bool) -> np.ndarray:
    "A uint8 map at the mask's size: noise, or the mask blurred and noised."
    if not structured: return rng.integers(0, 256, gt.shape, dtype=np.uint8)
    soft = cv2.GaussianBlur(gt.astype(np.float32), (0, 0), 3) / 255 * 0.8 + rng.random(gt.shape) * 0.25
    return (np.clip(soft, 0, 1) * 255).round().astype(np.uint8)


def write_map(path: Path, a: np.ndarray, form: str) -> np.ndarray:
    "Write map `a` in `form`; the uint8 grey array a reader must get back (before fitting to the mask)."
    h, w = a.shape
    if form == 'half': a = cv2.resize(a, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    if form == 'larger': a = cv2.resize(a, (w * 3 // 2, h * 3 // 2), interpolation=cv2.INTER_CUBIC)
    disk = {'grey16': a.astype(np.uint16) * 257, 'rgb': np.dstack([a] * 3),
            'rgba': np.dstack([a] * 3 + [np.full_like(a, 255)])}.get(form, a)
    assert cv2.imwrite(str(path.with_suffix('.bmp' if form == 'jpeg-free-bmp' else '.png')), disk)
    return a


def write_method(root: Path, gts: dict, sets: dict, seed: int, structured: bool, drop=(), extra=()) -> dict:
    "A released-maps folder root/<set>/ for `sets` (set folder name -> stems), all forms in turn; {stem: grey map}."
    rng, out = np.random.default_rng(seed), {}
    for k, (folder, stems) in enumerate(sets.items()):
        (root/folder).mkdir(parents=True)
        for j, n in enumerate(s for s in stems if s not in drop):
            gt = gts.get(n, np.zeros((10, 12), np.uint8))
            out[n] = write_map(root/folder/n, map_for(rng, gt, structured), FORMS[(j + k) % len(FORMS)])
        for n in extra: cv2.imwrite(str(root/folder/f'{n}.png'), rng.integers(0, 256, (9, 9), dtype=np.uint8))
    return out


def direct(pairs: list, gts: dict, grey: dict) -> dict:
    "PySODMetrics applied directly (each map fitted with cv2 bilinear as PySODEvalToolkit), plus IoU and Dice by numpy."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        sm, wfm, mae, em, fm = M.Smeasure(), M.WeightedFmeasure(), M.MAE(), M.Emeasure(), M.Fmeasure(beta=0.3)
    ious, dices = [], []
    for n in pairs:
        gt, p = gts[n], grey[n]
        if p.shape != gt.shape: p = cv2.resize(p, gt.shape[::-1], interpolation=cv2.INTER_LINEAR)
        for m in (sm, wfm, mae, em, fm): m.step(pred=p, gt=gt)
        P, G = p >= 128, gt > 128
        u, s = (P | G).sum(), P.sum() + G.sum()
        ious.append((P & G).sum() / u if u else 1.0)
        dices.append(2 * (P & G).sum() / s if s else 1.0)
    e, f = em.get_results()['em'], fm.get_results()
    return {'Sm': sm.get_results()['sm'], 'wFm': wfm.get_results()['wfm'], 'MAE': mae.get_results()['mae'],
            'adpEm': e['adp'], 'meanEm': e['curve'].mean(), 'maxEm': e['curve'].max(), 'adpFm': f['fm']['adp'],
            'meanFm': f['fm']['curve'].mean(), 'maxFm': f['fm']['curve'].max(), 'IoU': np.mean(ious),
            'Dice': np.mean(dices), 'curves': {'precision': f['pr']['p'][::-1], 'recall': f['pr']['r'][::-1],
                                               'fm': f['fm']['curve'][::-1], 'em': e['curve'][::-1]}}


def assert_direct(result: dict, ref: dict):
    for k in FULL_METRICS: assert abs(result[k] - ref[k]) <= 1e-6, (k, result[k], ref[k])
    for k in CURVE_KEYS: np.testing.assert_allclose(result['curves'][k], ref['curves'][k], rtol=0, atol=1e-6)


@pytest.fixture(scope='module')
def field(tmp_path_factory):
    "A dataset of three test sets and two released methods (random and structured maps, every form)."
    root = tmp_path_factory.mktemp('field')
    gts = write_dataset(root/'TestDataset')
    both = {'cod10k': COD, 'CAMO': CAMO}  # a lower-case set folder: matched up to case
    grey = {'Noise': write_method(root/'Noise', gts, both, 1, False),
            'Blur': write_method(root/'Blur', gts, {**both, 'chameleon': CHAMELEON, 'Extra-set': ['x']}, 2, True,
                                 drop=(COD[1], CAMO[3]), extra=('stray_1', 'COD10K-NonCAM-9-x-1'))}
    return root, gts, grey


def test_maps_equal_pysodmetrics_directly(field, tmp_path):
    root, gts, grey = field
    sets = discover(root/'TestDataset').tests
    assert sorted(sets) == ['CAMO', 'CHAMELEON', 'COD10K'] and len(sets['COD10K']) == len(COD) - 1  # NonCAM left out
    said = []
    for name in ('Noise', 'Blur'):
        res = score_method(load_method(name, root/name), sets, workers=1, say=said.append)
        for s, r in res.items():
            scored = [p.name for p in sets[s] if p.name in grey[name]]
            assert r['images'] == len(scored) and r['method'] == name and r['dataset'] == s
            assert_direct(r, direct(scored, gts, grey[name]))
    assert list(res) == list(sets) == ['CAMO', 'CHAMELEON', 'COD10K']  # the sets' order, not the folders'
    cod, camo = res['COD10K'], res['CAMO']
    # NonCAM maps (the released one of the test set, and one of another name) are left out, not extra
    assert (cod['missing'], cod['extra'], cod['noncam']) == ([COD[1]], ['stray_1'], 2)
    assert (camo['missing'], camo['extra'], camo['noncam']) == ([CAMO[3]], ['stray_1'], 1)
    assert said == ['Noise: no maps for CHAMELEON', 'Blur: folder(s) matching no test set, left out: Extra-set']


def test_noncam_follows_the_checkpoint_protocol(field):
    "With include_noncam the NonCAM image is scored against an empty mask (counted), and its map is no longer extra."
    root, gts, grey = field
    sets = discover(root/'TestDataset', include_noncam=True).tests
    r = score_method(load_method('Noise', root/'Noise'), {'COD10K': sets['COD10K']}, include_noncam=True,
                     say=lambda *a: None)['COD10K']
    assert (r['images'], r['empty_masks'], r['noncam']) == (len(COD), 1, 0)
    assert_direct(r, direct([p.name for p in sets['COD10K']], gts, grey['Noise']))
    # the sets of a default discovery hold no NonCAM pair; asking for them here changes nothing it has not got
    plain = score_method(load_method('Noise', root/'Noise'), {'COD10K': sets['COD10K']}, say=lambda *a: None)['COD10K']
    assert (plain['images'], plain['empty_masks'], plain['noncam']) == (len(COD) - 1, 0, 1)


def test_one_worker_equals_several(tmp_path):
    "Three chunks and a short one, scored in one process and in three: every number and curve is identical."
    stems = [f'camourflage_{i:05d}' for i in range(maps.CHUNK * 3 + 5)]
    rng = np.random.default_rng(3)
    for sub in ('Imgs', 'GT'): (tmp_path/'TD'/'CAMO'/sub).mkdir(parents=True)
    gts = {}
    for n in stems:
        gts[n] = mask(rng, 30, 34)
        cv2.imwrite(str(tmp_path/'TD'/'CAMO'/'Imgs'/f'{n}.jpg'), np.zeros((30, 34, 3), np.uint8))
        cv2.imwrite(str(tmp_path/'TD'/'CAMO'/'GT'/f'{n}.png'), gts[n])
    write_method(tmp_path/'m', gts, {'CAMO': stems}, 4, True)
    sets, method = discover(tmp_path/'TD').tests, load_method('m', tmp_path/'m')
    one, three = (score_method(method, sets, workers=w, say=lambda *a: None) for w in (1, 3))
    assert one == three and one['CAMO']['images'] == len(stems)


def test_cache_reads_back_and_scores_only_what_changed(field, tmp_path, monkeypatch):
    root, gts, grey = field
    sets, cache = discover(root/'TestDataset').tests, tmp_path/'cache'
    calls, real = [], maps.score_items
    monkeypatch.setattr(maps, 'score_items', lambda items, *a, **k: calls.append(len(items)) or real(items, *a, **k))
    quiet = dict(cache_dir=cache, say=lambda *a: None)
    first = {n: score_method(load_method(n, root/n), sets, **quiet) for n in ('Noise', 'Blur')}
    assert len(calls) == 5 and len(list(cache.glob('maps-*.json'))) == 5
    said = []
    again = {n: score_method(load_method(n, root/n), sets, cache_dir=cache, say=said.append) for n in ('Noise', 'Blur')}
    assert again == first and len(calls) == 5  # identical rows, nothing scored
    assert 'Noise on COD10K: read back from the cache (6 maps)' in said
    # a map re-saved: that set only is scored again, and its row changes
    p = root/'Blur'/'CAMO'/f'{CAMO[0]}.png'
    old = p.read_bytes()
    cv2.imwrite(str(p), np.full(gts[CAMO[0]].shape, 200, np.uint8))
    try:
        third = score_method(load_method('Blur', root/'Blur'), sets, **quiet)
        assert len(calls) == 6 and third['CAMO'] != first['Blur']['CAMO'] and third['COD10K'] == first['Blur']['COD10K']
    finally: p.write_bytes(old)
    # another protocol (NonCAM kept) is another key; a damaged cache entry is scored again, not trusted
    score_method(load_method('Noise', root/'Noise'), {'COD10K': sets['COD10K']}, include_noncam=True, **quiet)
    assert len(calls) == 7
    for f in cache.glob('maps-*.json'): f.write_text('{not json')
    score_method(load_method('Noise', root/'Noise'), {'CAMO': sets['CAMO']}, **quiet)
    assert len(calls) == 8


@pytest.mark.parametrize('case, want', [
    ('missing', 'no such folder'), ('file', 'is a file, not a folder'), ('empty', 'holds no maps'),
    ('no-maps', 'holds no maps'), ('flat-many', 'name the set'), ('unknown-set', 'no test set NC4K'),
    ('wrong-names', 'none of the 2 maps'), ('empty-set-folder', '/cod10k holds no maps: add them'),
    ('no-set-folder', 'none of its folders')])
def test_bad_folders_are_one_line_exit_2(field, tmp_path, case, want):
    root, gts, grey = field
    sets = discover(root/'TestDataset').tests
    d, s = tmp_path/'m', None
    if case != 'missing': d.mkdir()
    if case == 'file': d = root/'Blur'/'CAMO'/f'{CAMO[0]}.png'
    if case == 'no-maps': (d/'notes.txt').write_text('x'); (d/'COD10K').mkdir()
    if case == 'flat-many': d = root/'Noise'/'CAMO'
    if case == 'unknown-set': d, s = root/'Noise'/'CAMO', 'NC4K'
    if case == 'wrong-names': (d/'CAMO').mkdir(); [cv2.imwrite(str(d/'CAMO'/f'{i}.png'), np.zeros((4, 4), np.uint8)) for i in 'ab']
    if case == 'empty-set-folder': write_method(d/'x', gts, {'CAMO': CAMO}, 0, False); d = d/'x'; (d/'cod10k').mkdir()
    if case == 'no-set-folder': write_method(d, gts, {'SOMETHING': CAMO}, 0, False)
    with pytest.raises(UsageError) as e:
        score_method(load_method('Net', d, s), sets, say=lambda *a: None)
    msg, rc = describe(e.value)
    assert rc == 2 and '\n' not in msg and want in msg and msg.startswith('--pred-dir Net='), msg


def test_a_damaged_map_names_its_file(field, tmp_path, monkeypatch):
    root, gts, grey = field
    monkeypatch.setattr(maps, 'CHUNK', 3)  # three chunks: with 2 workers the bad map is read in a worker process
    (tmp_path/'m'/'CAMO').mkdir(parents=True)
    for n in CAMO: cv2.imwrite(str(tmp_path/'m'/'CAMO'/f'{n}.png'), np.zeros((8, 8), np.uint8))
    bad = tmp_path/'m'/'CAMO'/f'{CAMO[2]}.png'
    bad.write_bytes(bad.read_bytes()[:-15])
    sets = discover(root/'TestDataset').tests
    for workers in (1, 2):  # from a worker process too
        with pytest.raises(ValueError, match=re.escape(f'damaged map {bad} (truncated')):
            score_method(load_method('m', tmp_path/'m'), {'CAMO': sets['CAMO']}, workers=workers, say=lambda *a: None)


def test_parse_pred_dir():
    assert parse_pred_dir('SINet-V2=maps/SINet-V2') == ('SINet-V2', 'maps/SINet-V2', None)
    assert parse_pred_dir('ZoomNet=maps/z:COD10K') == ('ZoomNet', 'maps/z', 'COD10K')
    with pytest.raises(UsageError, match='expected NAME=DIR'): parse_pred_dir('maps/SINet-V2')


def test_checkpoint_row_equals_its_saved_maps_row(ckpt, tmp_path):
    """`codseg evaluate --save-predictions` and then the saved maps through codseg.maps: the same row (the eight
    columns evaluate prints), and score_arrays on the same maps in memory gives the maps' result exactly."""
    from codseg.evaluate import METRICS, evaluate
    from codseg.maps import read_gt, read_map
    pack = tmp_path/'pack'/'TestDataset'
    rng = np.random.default_rng(5)
    for s, n in (('SETA', 5), ('SETB', 4)):
        for sub in ('Imgs', 'GT'): (pack/s/sub).mkdir(parents=True)
        for i in range(n):
            h, w = 40 + 7 * i, 64 - 5 * i
            cv2.imwrite(str(pack/s/'Imgs'/f'{s}{i}.jpg'), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            cv2.imwrite(str(pack/s/'GT'/f'{s}{i}.png'), mask(rng, h, w))
    rows = evaluate(ckpt, pack.parent, output=tmp_path/'out', save_predictions=tmp_path/'saved', device='cpu',
                    num_workers=0, say=lambda *a: None)
    sets = discover(pack.parent).tests
    res = score_method(load_method('ckpt', tmp_path/'saved'), sets, workers=2, say=lambda *a: None)
    for r in rows:
        m = res[r['dataset']]
        assert (m['images'], m['missing'], m['extra']) == (r['images'], [], [])
        for k in METRICS: assert abs(m[k] - r[k]) <= 1e-12, (r['dataset'], k, m[k], r[k])
        mem = score_arrays([(p.name, read_map(tmp_path/'saved'/r['dataset']/f'{p.name}.png'), read_gt(p))
                            for p in sets[r['dataset']]], 'ckpt', r['dataset'])
        assert {k: mem[k] for k in (*FULL_METRICS, 'curves')} == {k: m[k] for k in (*FULL_METRICS, 'curves')}


def test_report_files(field, tmp_path):
    "The report of real results: every file written, the tables marking the best, the curves redrawn from curves.json."
    from codseg.report import draw_curves, format_terminal, write_report
    root, gts, grey = field
    sets = discover(root/'TestDataset').tests
    results = [r for n in ('Noise', 'Blur') for r in score_method(load_method(n, root/n), sets, say=lambda *a: None).values()]
    paths = write_report(results, tmp_path/'report')
    assert {p.name for p in paths.values()} == {'results.csv', 'results.json', 'results.md', 'results.tex', 'curves.json',
                                                'pr_curves.png', 'pr_curves.pdf', 'fm_curves.png', 'fm_curves.pdf'}
    j = json.loads(paths['json'].read_text())['datasets']
    blur = next(r for r in j['COD10K']['rows'] if r['method'] == 'Blur')
    assert blur['missing'] == [COD[1]] and 'Sm' in blur['best'] and j['COD10K']['test_images'] == len(COD) - 1
    tex = paths['tex'].read_text()
    assert tex.count(r'\toprule') == 3 and r'\textbf{' in tex
    text = format_terminal(results)
    assert text.startswith('CAMO: 8 test images') and 'COD10K: 6 test images' in text and 'Blur on CAMO: 1 test image(s) have no map' in text
    assert set(draw_curves(paths['curves'], tmp_path/'again')) == {'pr_png', 'pr_pdf', 'fm_png', 'fm_pdf'}


def codseg_cli(*args, timeout=600):
    import os, subprocess, sys
    r = subprocess.run([sys.executable, '-m', 'codseg', *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return r.returncode, r.stdout + r.stderr


def test_cli_a_checkpoint_beside_its_saved_maps(tmp_path, ckpt):
    "codseg evaluate --save-predictions, then those maps through --pred-dir beside the checkpoint: the same row."
    base = ['evaluate', '--dataset-path', 'synthetic', '--device', 'cpu']
    rc, out = codseg_cli(*base, '--checkpoint', ckpt, '--save-predictions', tmp_path/'maps',
                         '--output', tmp_path/'one', '--num-workers', 0)
    assert rc == 0, out
    rc, out = codseg_cli(*base, '--checkpoint', ckpt, '--pred-dir', f"saved={tmp_path/'maps'}:COD10K",
                         '--output', tmp_path/'cmp', '--num-workers', 2)
    assert rc == 0 and 'tables and curves written to' in out, out
    res = json.loads((tmp_path/'cmp'/'results.json').read_text())
    one = json.loads((tmp_path/'one'/'eval_best_model.json').read_text())['results'][0]
    flat = [r for r in _rows(res) if r['dataset'] == 'COD10K']
    assert {r['method'] for r in flat} == {'best_model', 'saved'}, flat
    for r in flat:
        for k in ('Sm', 'MAE', 'IoU', 'Dice', 'adpEm', 'maxEm', 'wFm'):
            assert abs(r[k] - one[k]) < 1e-6, (r['method'], k, r[k], one[k])
    assert (tmp_path/'cmp'/'results.tex').read_text().count(r'\toprule') >= 1


def _rows(res) -> list:
    "Every row of a results.json, whatever its grouping."
    if isinstance(res, list): return [r for x in res for r in _rows(x)]
    if isinstance(res, dict):
        if 'method' in res and 'dataset' in res: return [res]
        return [r for v in res.values() for r in _rows(v)]
    return []


def test_cli_refuses_without_a_method_and_a_bad_pred_dir_in_one_line(tmp_path):
    rc, out = codseg_cli('evaluate', '--dataset-path', 'synthetic')
    assert rc == 2 and 'give at least one' in out and len(out.strip().splitlines()) == 1, out
    (tmp_path/'empty').mkdir()
    rc, out = codseg_cli('evaluate', '--dataset-path', 'synthetic', '--pred-dir', f"x={tmp_path/'empty'}")
    assert rc == 2 and str(tmp_path/'empty') in out and len(out.strip().splitlines()) == 1, out

AFTER_THREADS = '''
import pathlib, tempfile, numpy as np, cv2, sys
from concurrent.futures import ThreadPoolExecutor
from codseg.maps import load_method, score_method
from codseg.layout import Pair
assert 'codseg.data' not in sys.modules  # no fork hook of the data module here
td = pathlib.Path(tempfile.mkdtemp())
(td/'m'/'S').mkdir(parents=True)
pairs = []
for i in range(12):
    cv2.imwrite(str(td/f'{i}.jpg'), np.zeros((40, 50, 3), np.uint8)); cv2.imwrite(str(td/f'{i}.png'), np.eye(40, 50, dtype=np.uint8) * 255)
    cv2.imwrite(str(td/'m'/'S'/f'{i}.png'), np.full((20, 25), 9 * i, np.uint8)); pairs.append(Pair(td/f'{i}.jpg', td/f'{i}.png', str(i)))
big = np.zeros((1500, 1500, 3), np.uint8)
for _ in range(3):  # the parent uses OpenCV's thread pool from several threads, then starts workers
    with ThreadPoolExecutor(2) as ex: list(ex.map(lambda _: cv2.resize(big, (700, 600), interpolation=cv2.INTER_AREA), range(4)))
    one = score_method(load_method('m', td/'m'), {'S': pairs}, workers=1, say=lambda *a: None)
    assert score_method(load_method('m', td/'m'), {'S': pairs}, workers=2, say=lambda *a: None) == one
print('ok')
'''


def test_workers_start_after_the_parent_used_opencv_threads():
    "A forked child of a process that ran OpenCV in parallel hangs in cv2; the workers come from a fork server instead."
    import subprocess, sys
    r = subprocess.run([sys.executable, '-c', AFTER_THREADS], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr[-2000:]


def test_score_benchmark_smoke(capsys):
    "Smoke test only (no floor: the figure depends on the load of a shared CPU): score_speed runs and prints its figure."
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]/'benchmarks'))
    import score_speed
    score_speed.main(['--n', '6', '--width', '96', '--height', '64', '--repeats', '1', '--workers', '2'])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r'score speedup \(2 workers vs 1 process\): \d+\.\d\dx', last), last
