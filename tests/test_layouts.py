"""Mock trees of the public COD dataset layouts, as Kaggle mounts them: every set found, each with its role (train,
val, test) and count; test sets never trained on; archives extracted outside the input; the input never written."""
import json, os, re, shutil, stat, tarfile, zipfile
from pathlib import Path
import numpy as np, cv2, pytest
from codseg.cli import main
from codseg.config import Config
from codseg.image import DataError
from codseg.layout import find_dataset_root, layouts_md
from codseg.roles import discover, train_val_pairs

CAM = 'COD10K-CAM-1-Aquatic-1-BatFish-{}'
NONCAM = 'COD10K-NonCAM-1-Aquatic-1-Sea-{}'


def img(path: Path, mask=False):
    "Write a tiny 8x8 JPEG image (or PNG mask: black and white, as masks are) at `path`."
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.kron([[0, 255], [255, 0]], np.ones((4, 4))).astype(np.uint8) if mask else np.full((8, 8, 3), 90, np.uint8)
    ok, buf = cv2.imencode(path.suffix, a); assert ok
    path.write_bytes(buf.tobytes())


def pairs(root: Path, imgs: str, gts: str, stems):
    "Image `imgs/<stem>.jpg` and mask `gts/<stem>.png` under `root` for each stem."
    for s in stems: img(root/imgs/f'{s}.jpg'); img(root/gts/f'{s}.png', mask=True)


def cod10k(root: Path, train=6, noncam_train=3, test=4, noncam_test=2):
    "COD10K-v3 as published: Train/Test with Image, GT_Object, GT_Edge; CAM and NonCAM images."
    pairs(root, 'Train/Image', 'Train/GT_Object', [CAM.format(i) for i in range(train)] + [NONCAM.format(i) for i in range(noncam_train)])
    pairs(root, 'Test/Image', 'Test/GT_Object', [CAM.format(100 + i) for i in range(test)] + [NONCAM.format(100 + i) for i in range(noncam_test)])
    img(root/'Train'/'GT_Edge'/f'{CAM.format(0)}.png', mask=True)
    return root


def camo(root: Path, train=5, test=3):
    "CAMO-V.1.0-CVIU2019: Images/{Train,Test} + one GT folder."
    for i in range(train): img(root/'Images'/'Train'/f'camourflage_{i:05d}.jpg'); img(root/'GT'/f'camourflage_{i:05d}.png', True)
    for i in range(test): img(root/'Images'/'Test'/f'camourflage_{900 + i:05d}.jpg'); img(root/'GT'/f'camourflage_{900 + i:05d}.png', True)
    return root


def plain(root: Path, n, prefix, imgs='Imgs', gts='GT'):
    pairs(root, imgs, gts, [f'{prefix}{i}' for i in range(n)]); return root


def snapshot(folder: Path) -> dict:
    "Every path under `folder` with its size and mtime."
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob('*'))}


def check(capsys, *args) -> tuple[int, dict]:
    "`codseg data-check --json ARGS`: (status, the JSON object)."
    rc = main(['data-check', '--json', *map(str, args)]); out = capsys.readouterr().out
    return rc, json.loads(out)


def roles(js) -> dict: return {k: v['role'] for k, v in js['roles'].items()}


@pytest.fixture
def session(tmp_path):
    "The realistic Kaggle session: COD10K 2026 mount, CAMO, standalone NC4K and CHAMELEON, the wheel, a previous output."
    kin = tmp_path/'kaggle'/'input'
    cod10k(kin/'datasets'/'someone'/'cod10k-dataset'/'COD10K-v3')
    camo(kin/'datasets'/'other'/'camo-dataset'/'CAMO-V.1.0-CVIU2019')
    plain(kin/'datasets'/'x'/'nc4k'/'NC4K', 5, 'nc')
    plain(kin/'datasets'/'y'/'chameleon-dataset'/'CHAMELEON', 4, 'animal-')
    (kin/'datasets'/'me'/'codseg-wheel').mkdir(parents=True)
    (kin/'datasets'/'me'/'codseg-wheel'/'codseg-0.1-py3-none-any.whl').write_bytes(b'PK')
    prev = kin/'notebooks'/'me'/'codseg-train'/'checkpoints'; prev.mkdir(parents=True)
    (prev/'last.pth').write_bytes(b'0'); (prev/'history.csv').write_text('epoch\n1\n'); img(prev/'curves.png')
    return kin


def test_realistic_session_roles_and_counts(session, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv('CODSEG_CACHE', str(tmp_path/'cache'))
    before = snapshot(session)
    rc, js = check(capsys, '--dataset-path', session, '--seed', 0)
    assert rc == 0, js
    assert roles(js) == {'COD10K-train': 'train', 'COD10K': 'test', 'CAMO-train': 'train', 'CAMO': 'test',
                         'NC4K': 'test', 'CHAMELEON': 'test'}, js['roles']
    assert js['test'] == {'COD10K': 4, 'CAMO': 3, 'NC4K': 5, 'CHAMELEON': 4}  # COD10K test: CAM only
    assert js['train'] + js['val'] == 6 + 5 and js['val'] == 1 and js['noncam_excluded'] == {'train': 3, 'COD10K': 2}
    assert 'test only' in js['roles']['NC4K']['reason'] and 'Test split' in js['roles']['CAMO']['reason']
    assert js['bad'] == [] and js['test_trained'] == [] and js['seed'] == 0
    tr, va, found = train_val_pairs(Config(dataset_path=str(session), seed=0))
    test_names = {p.name for ps in found.tests.values() for p in ps}
    assert not test_names & {p.name for p in tr + va}, 'a test image is trained on or validated on'
    assert snapshot(session) == before


def test_training_on_a_test_set_needs_the_flag(session, capsys):
    rc = main(['data-check', '--dataset-path', str(session), '--train-sets', 'COD10K-train,NC4K'])
    assert rc == 2 and 'NC4K is a test set' in capsys.readouterr().err
    rc, js = check(capsys, '--dataset-path', session, '--train-sets', 'COD10K-train,NC4K', '--allow-test-training')
    assert rc == 0 and js['test_trained'] == ['NC4K'] and roles(js)['NC4K'] == 'train' and roles(js)['CAMO-train'] == 'unused'
    assert js['train'] + js['val'] == 6 + 5 and 'NC4K' not in js['test']
    rc, js = check(capsys, '--dataset-path', session, '--test-sets', 'CAMO,NC4K')
    assert rc == 0 and js['test'] == {'CAMO': 3, 'NC4K': 5} and roles(js)['COD10K'] == 'unused' and roles(js)['CHAMELEON'] == 'unused'
    rc, js = check(capsys, '--dataset-path', session, '--val-path', 'CHAMELEON')
    assert rc == 2 and 'CHAMELEON is a test set' in js['error']
    rc, js = check(capsys, '--dataset-path', session, '--val-path', 'CAMO-train')
    assert rc == 0 and roles(js)['CAMO-train'] == 'val' and (js['train'], js['val']) == (6, 5)
    rc, js = check(capsys, '--dataset-path', session, '--train-sets', 'NOPE')
    assert rc == 2 and 'no set named NOPE' in js['error'] and 'COD10K-train' in js['error']


def test_legacy_mount_and_sinet_packs_nested(tmp_path, capsys):
    kin = tmp_path/'input'
    cod10k(kin/'cod10k-dataset'/'versions'/'2'/'COD10K-v3')
    pack = kin/'sinet-pack'
    pairs(pack/'TrainDataset'/'TrainDataset', 'Imgs', 'GT', [CAM.format(0), CAM.format(1), 'camourflage_00001', 'camourflage_00002'])
    for name, n in (('COD10K', 3), ('CAMO', 2), ('NC4K', 2), ('CHAMELEON', 1)):
        plain(pack/'TestDataset'/'TestDataset'/name, n, f'{name.lower()}-t')
    before = snapshot(kin)
    rc, js = check(capsys, '--dataset-path', pack)
    assert rc == 0 and js['layout'] == 'SINet', js
    assert roles(js) == {'TrainDataset': 'train', 'CAMO': 'test', 'CHAMELEON': 'test', 'COD10K': 'test', 'NC4K': 'test'}
    assert js['test'] == {'CAMO': 2, 'CHAMELEON': 1, 'COD10K': 3, 'NC4K': 2} and js['train'] + js['val'] == 4
    rc, js = check(capsys, '--dataset-path', kin)  # both: COD10K's test split and the pack's COD10K test set differ
    assert rc == 0 and roles(js)['COD10K'] == 'test' and roles(js)['COD10K-train'] == 'train'
    assert js['train'] + js['val'] == 6 + 2 and js['test']['COD10K'] == 3 and js['test']['COD10K@COD10K-v3'] == 4
    assert any('2 training image(s) of ' in p and 'repeat names' in p for p in js['problems'])  # the pack holds COD10K's
    assert snapshot(kin) == before


def test_nested_duplicate_copies_counted_once(tmp_path, capsys):
    kin = tmp_path/'input'
    cod10k(kin/'cod10k'/'COD10K-v3'); cod10k(kin/'cod10k'/'COD10K-v3'/'COD10K-v3')
    camo(kin/'camo'/'CAMO-V.1.0-CVIU2019'); camo(kin/'camo'/'CAMO-V.1.0-CVIU2019'/'CAMO-V.1.0-CVIU2019')
    rc, js = check(capsys, '--dataset-path', kin)
    assert rc == 0 and js['test'] == {'COD10K': 4, 'CAMO': 3} and js['train'] + js['val'] == 11, js
    assert sum('(a copy)' in p for p in js['problems']) == 4


def test_images_gts_with_split_subfolders(tmp_path, capsys):
    d = tmp_path/'input'/'cod-data'
    pairs(d, 'images/train', 'gts/train', [f'a{i}' for i in range(5)])
    pairs(d, 'images/test', 'gts/test', [f'b{i}' for i in range(2)])
    rc, js = check(capsys, '--dataset-path', d)
    assert rc == 0 and js['layout'] == 'split-folders' and roles(js) == {'cod-data-train': 'train', 'cod-data': 'test'}
    assert js['test'] == {'cod-data': 2} and js['train'] + js['val'] == 5 and js['bad'] == [], js
    e = tmp_path/'input'/'camo-kaggle'  # a known name, other folder names
    for i in range(3): img(e/'Image'/'Train'/f'camourflage_{i:05d}.jpg'); img(e/'mask'/'train'/f'camourflage_{i:05d}.png', True)
    img(e/'Image'/'Test'/'camourflage_00999.jpg'); img(e/'mask'/'test'/'camourflage_00999.png', True)
    rc, js = check(capsys, '--dataset-path', e)
    assert rc == 0 and roles(js) == {'CAMO-train': 'train', 'CAMO': 'test'} and js['test'] == {'CAMO': 1}


def test_train_image_train_gt_layout(tmp_path, capsys):
    d = tmp_path/'input'/'cod10k-kaggle'
    pairs(d, 'Train_Image', 'Train_GT', [CAM.format(i) for i in range(4)] + [NONCAM.format(0)])
    pairs(d, 'Test_Image', 'Test_GT', [CAM.format(50 + i) for i in range(3)])
    rc, js = check(capsys, '--dataset-path', d)
    assert rc == 0 and js['layout'] == 'Train_Image' and roles(js) == {'COD10K-train': 'train', 'COD10K': 'test'}, js
    assert js['test'] == {'COD10K': 3} and js['train'] + js['val'] == 4 and js['noncam_excluded'] == {'train': 1}


@pytest.mark.parametrize('kind', ['zip', 'tar.gz'])
def test_archive_in_read_only_input(tmp_path, capsys, kind):
    src = cod10k(tmp_path/'src'/'COD10K-v3')
    kin = tmp_path/'input'/'cod10k-zip'; kin.mkdir(parents=True)
    arc = kin/f'COD10K-v3.{kind}'
    if kind == 'zip':
        with zipfile.ZipFile(arc, 'w') as z:
            for p in sorted(src.rglob('*')): z.write(p, p.relative_to(src.parent))
    else:
        with tarfile.open(arc, 'w:gz') as t: t.add(src, 'COD10K-v3')
    xd = tmp_path/'extract'
    for p in [kin, *kin.rglob('*')]: p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = snapshot(kin)
    try:
        rc, js = check(capsys, '--dataset-path', kin, '--extract-dir', xd)
        assert rc == 0 and roles(js) == {'COD10K-train': 'train', 'COD10K': 'test'}, js
        assert js['test'] == {'COD10K': 4} and js['train'] + js['val'] == 6
        assert f'archive {arc} holds 31 images' in js['archives'][0] and 'extracted into' in js['archives'][0]
        assert 'COD10K-v3/Train/Image (9)' in js['archives'][0]
        rc, js = check(capsys, '--dataset-path', kin, '--extract-dir', xd)
        assert rc == 0 and 'already extracted in' in js['archives'][0]  # once
        assert len([p for p in xd.iterdir() if not p.name.startswith('.')]) == 1  # one folder (and its lock file)
        rc = main(['data-check', '--dataset-path', str(kin), '--extract-dir', str(kin/'x')])
        assert rc == 2 and 'never writes into its inputs' in capsys.readouterr().err
        assert snapshot(kin) == before
    finally:
        for p in [kin, *kin.rglob('*')]: p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_not_found_names_what_was_looked_for_and_there(tmp_path, capsys):
    d = tmp_path/'input'/'odd'
    img(d/'pictures'/'a.jpg'); img(d/'outlines'/'a.png', True)
    rc = main(['data-check', '--dataset-path', str(d)])
    err = capsys.readouterr().err
    assert rc == 2 and 'no dataset found' in err and 'Train_Image' in err and 'pictures/' in err and 'outlines/' in err


def test_flagged_training_then_evaluate_scores_every_test_set(session, tmp_path, monkeypatch):
    """A tiny run trained on COD10K train + NC4K (allowed, so flagged in the banner and history.csv); `evaluate` then
    scores every test set found in the session, NC4K marked as trained on in the table."""
    import torch
    from codseg.train import train
    from codseg.evaluate import evaluate
    monkeypatch.setenv('CODSEG_CACHE', str(tmp_path/'cache')); torch.set_num_threads(1)
    before, said = snapshot(session), []
    cfg = Config(dataset_path=str(session), train_sets='COD10K-train,NC4K', allow_test_training=True, epochs=2,
                 stage1_epochs=1, img_size=64, backbone='edgenext_xx_small', pretrained=False, num_experts=2, batch_size=4,
                 accumulation_steps=1, num_workers=0, device='cpu', checkpoint_dir=str(tmp_path/'run'), seed=0)
    train(cfg, say=lambda *a: said.append(' '.join(map(str, a))))
    log = '\n'.join(said)
    assert 'WARNING: this run trains or validates on the test set(s) NC4K' in log and 'NC4K: train (--train-sets NC4K' in log
    rows = (tmp_path/'run'/'history.csv').read_text().splitlines()
    assert rows[0].endswith(',test_trained') and all(r.endswith(',NC4K') for r in rows[1:]) and len(rows) == 3
    out = []
    res = evaluate(tmp_path/'run'/'best_model.pth', session, output=tmp_path/'res', device='cpu', num_workers=0,
                   say=out.append, progress=True)
    assert {r['dataset']: r['images'] for r in res} == {'COD10K': 4, 'CAMO': 3, 'NC4K [trained on]': 5, 'CHAMELEON': 4}
    assert json.loads((tmp_path/'res'/'eval_best_model.json').read_text())['test_trained'] == ['NC4K']
    assert snapshot(session) == before


def test_archive_without_images_and_only_images_say_what_is_there(tmp_path, capsys):
    kin = tmp_path/'input'/'cod10k-zip'; kin.mkdir(parents=True)
    with zipfile.ZipFile(kin/'COD10K-v3.zip', 'w') as z: z.writestr('COD10K-v3/README.txt', 'no images')
    rc, js = check(capsys, '--dataset-path', kin, '--extract-dir', tmp_path/'x')
    assert rc == 1 and 'COD10K-v3.zip: no images inside; not extracted' in ' '.join(js['problems']), js
    d = tmp_path/'input'/'only-images'
    img(d/'deep'/'Imgs'/'a.jpg')
    rc = main(['data-check', '--dataset-path', str(d)])
    err = capsys.readouterr().err
    assert rc == 2 and 'folders holding images: deep/Imgs/' in err and 'mask folders:' in err


def test_names_by_token_not_by_substring(tmp_path, capsys):
    "'camouflage' is not CAMO; 'TrainingSet' and 'cod10kv3' are read; a plain folder of another name is trained on."
    kin = tmp_path/'input'
    plain(kin/'camouflage-photos', 3, 'p')
    pairs(kin/'cod10kv3', 'TrainingSet/Imgs', 'TrainingSet/GT', [CAM.format(i) for i in range(2)])
    pairs(kin/'cod10kv3', 'TestingSet/Imgs', 'TestingSet/GT', [CAM.format(10 + i) for i in range(2)])
    rc, js = check(capsys, '--dataset-path', kin)
    assert rc == 0 and roles(js) == {'camouflage-photos': 'train', 'COD10K-train': 'train', 'COD10K': 'test'}, js


def test_the_roots_own_name_says_a_split_only_as_a_whole_word(tmp_path, capsys):
    "A --dataset-path folder named like 'test_run0' (pytest's, a notebook's) is no Test split; one named 'Test' is."
    for name, role in (('test_run0', 'train'), ('my-test-copy', 'train'), ('Test', 'test'), ('testing', 'test')):
        top = tmp_path/name
        plain(top/'birds', 3, 'b')
        plain(top/'fish', 2, 'f')
        rc, js = check(capsys, '--dataset-path', top)
        assert set(roles(js).values()) == {role}, (name, js['roles'])
        assert rc == (0 if role == 'train' else 1), (name, rc)  # only test sets: nothing to train on


def test_duts_layout_is_one_entry(tmp_path, capsys):
    "DUTS (DUTS-TR/DUTS-TR-Image + -Mask, DUTS-TE/...): its Test split tested, its Train split trained on only when named."
    kin = tmp_path/'input'
    d = kin/'duts-saliency-detection-dataset'
    pairs(d/'DUTS-TR', 'DUTS-TR-Image', 'DUTS-TR-Mask', [f'n01532829_{i}' for i in range(5)])
    pairs(d/'DUTS-TE', 'DUTS-TE-Image', 'DUTS-TE-Mask', [f'ILSVRC2012_test_{i:08d}' for i in range(3)])
    before = snapshot(d)
    rc, js = check(capsys, '--dataset-path', d)
    assert rc == 1 and js['layout'] == 'DUTS' and roles(js) == {'DUTS': 'test', 'DUTS-train': 'unused'}, js
    assert js['test'] == {'DUTS': 3} and js['would_train'] is False and 'salient-object' in js['roles']['DUTS-train']['reason']
    rc, js = check(capsys, '--dataset-path', d, '--train-sets', 'duts-train', '--seed', 0)
    assert rc == 0 and roles(js) == {'DUTS': 'test', 'DUTS-train': 'train'} and js['train'] + js['val'] == 5, js
    rc, js = check(capsys, '--dataset-path', d/'DUTS-TR', '--train-sets', 'DUTS-train')  # one split on its own
    assert rc == 0 and js['layout'] == 'DUTS' and roles(js) == {'DUTS-train': 'train'}, js
    cod10k(kin/'cod10k'/'COD10K-v3')  # beside COD10K: COD10K's recipe, DUTS's Test split one more test set
    rc, js = check(capsys, '--dataset-path', kin)
    assert rc == 0 and roles(js) == {'COD10K': 'test', 'COD10K-train': 'train', 'DUTS': 'test', 'DUTS-train': 'unused'}, js
    assert js['train'] + js['val'] == 6 and snapshot(d) == before  # COD10K's 6 CAM training images; DUTS never written


def test_readme_lists_the_layouts_of_the_table():
    "README's list of layouts is the one `codseg.layout.LAYOUTS` makes: a layout added to the table is documented."
    text = (Path(__file__).resolve().parents[1]/'README.md').read_text()
    m = re.search(r'<!-- layouts[^\n]*-->\n(.*?)\n<!-- /layouts -->', text, re.S)
    assert m and m[1] == layouts_md(), 'README.md between the layouts markers should read:\n' + layouts_md()


def test_val_path_folder_that_does_not_exist(session, capsys):
    rc, js = check(capsys, '--dataset-path', session, '--val-path', session/'nope'/'CAMO-V.1.0')
    assert rc == 1 and any("nope/CAMO-V.1.0' does not exist" in p for p in js['problems']), js


JSON_FIELDS = {'layout', 'root', 'train', 'val', 'test', 'roles', 'noncam_excluded', 'bad', 'problems', 'test_trained',
               'archives', 'seed', 'val_fraction', 'val_path', 'would_train', 'masks'}  # docs/SPEC.md's list


def test_data_check_json_fields(session, capsys):
    "Every field of `data-check --json` that SPEC lists, with its value, here with NonCAM kept and a named val set."
    rc, js = check(capsys, '--dataset-path', session, '--include-noncam', '--val-path', 'CAMO-train', '--seed', 5)
    assert rc == 0 and set(js) == JSON_FIELDS, sorted(set(js) ^ JSON_FIELDS)
    assert (js['layout'], js['root']) == ('multi', str(session/'datasets'))  # the folder holding every root
    assert (js['train'], js['val']) == (6 + 3, 5) and js['test'] == {'COD10K': 4 + 2, 'CAMO': 3, 'NC4K': 5, 'CHAMELEON': 4}
    assert js['noncam_excluded'] == {} and js['bad'] == [] and js['test_trained'] == [] and js['archives'] == []
    assert (js['seed'], js['val_fraction'], js['val_path'], js['would_train']) == (5, None, 'CAMO-train', True)
    rc, js = check(capsys, '--dataset-path', session, '--seed', 5)
    assert rc == 0 and set(js) == JSON_FIELDS and js['noncam_excluded'] == {'train': 3, 'COD10K': 2}
    assert (js['val_fraction'], js['val_path'], js['would_train']) == (0.1, None, True)
    (session/'datasets'/'x'/'nc4k'/'NC4K'/'GT'/'nc0.png').unlink()  # a test image without a mask: listed, no stop
    (session/'datasets'/'other'/'camo-dataset'/'CAMO-V.1.0-CVIU2019'/'GT'/'camourflage_00001.png').unlink()
    rc, js = check(capsys, '--dataset-path', session)
    assert rc == 1 and set(js) == JSON_FIELDS and js['would_train'] is False, js
    assert sorted(b['file'].rsplit('/', 1)[1] for b in js['bad']) == ['camourflage_00001.jpg', 'nc0.jpg']
    assert all(b['reason'] == 'no mask' for b in js['bad'])
