"""The Kaggle side: kernel metadata passes the kaggle CLI's own validation, the push script's dry run, and the
kernel notebook run headless (execnb) on a fake `/kaggle/input` built from the synthetic dataset."""
import json, os, re, shutil, subprocess, sys, textwrap
from pathlib import Path
import cv2
import pytest

REPO = Path(__file__).resolve().parents[1]
KAGGLE = REPO / 'kaggle'
NB = KAGGLE / 'codseg-train.ipynb'
sys.path.insert(0, str(KAGGLE))
import push  # kaggle/push.py

# --- kernel-metadata.json through the kaggle CLI's validation -------------------------------------------------
# `KaggleApi.kernels_push` validates the metadata and the notebook, then opens a client and sends the request.
# The check runs it in a fresh process with a fake credentials file, sockets disabled, and the client replaced by
# one that records the request and stops: everything up to the network call is the CLI's own code.
VALIDATE = textwrap.dedent('''
    import json, socket, sys
    def no_net(*a, **k): raise OSError('network disabled in this test')
    socket.socket.connect = socket.create_connection = no_net
    from kaggle.api.kaggle_api_extended import KaggleApi
    class Sent(Exception): pass
    class Client:
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def save_kernel(self, req): raise Sent(req)
        @property
        def kernels(self): return type('K', (), {'kernels_api_client': self})()
    api = KaggleApi(); api.build_kaggle_client = Client
    try: api.kernels_push(sys.argv[1]); print('NOT SENT')
    except Sent as e:
        r = e.args[0]
        print(json.dumps(dict(slug=r.slug, title=r.new_title, language=r.language, kernel_type=r.kernel_type,
            enable_gpu=r.enable_gpu, enable_internet=r.enable_internet, machine_shape=r.machine_shape,
            datasets=list(r.dataset_data_sources), kernels=list(r.kernel_data_sources),
            models=list(r.model_data_sources or []), text=r.text)))
''')

def kaggle_validate(folder, tmp_path):
    "Run the kaggle CLI's push validation on `folder`; (returncode, request dict or None, output)."
    cfg = tmp_path / 'kaggle-config'; cfg.mkdir(exist_ok=True)
    (cfg / 'kaggle.json').write_text(json.dumps({'username': 'codseg-ci', 'key': '0' * 32}))
    (cfg / 'kaggle.json').chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith('KAGGLE_')}
    env.update(HOME=str(tmp_path), KAGGLE_CONFIG_DIR=str(cfg))
    r = subprocess.run([sys.executable, '-c', VALIDATE, str(folder)], capture_output=True, text=True, env=env,
                       timeout=120)
    last = r.stdout.strip().splitlines()[-1:] if r.stdout.strip() else []
    req = json.loads(last[0]) if last and last[0].startswith('{') else None
    return r.returncode, req, r.stdout + r.stderr

def test_metadata_passes_kaggle_validation(tmp_path):
    rc, req, err = kaggle_validate(KAGGLE, tmp_path)
    assert rc == 0 and req is not None, err
    assert 'does not resolve to the specified id' not in err, err  # the title slugifies to the kernel slug
    assert (req['language'], req['kernel_type']) == ('python', 'notebook')
    assert req['enable_gpu'] is True and req['machine_shape'] == 'NvidiaTeslaT4'
    assert isinstance(req['enable_internet'], bool)
    meta = json.loads((KAGGLE / 'kernel-metadata.json').read_text())
    assert 'enable_internet' in meta, 'the internet setting must be explicit'
    assert [s.split('/')[1] for s in req['datasets']] == ['cod10k-dataset', 'codseg-wheel']
    nb = json.loads(req['text'])  # the notebook as sent: cells without outputs
    assert any(c['source'].startswith('# parameters') for c in nb['cells'])

def test_metadata_rejects_bad_settings(tmp_path):
    "The validation used above does reject bad metadata (so passing it means something)."
    for bad in ({'kernel_type': 'dashboard'}, {'language': 'julia'}, {'dataset_sources': ['no-owner']},
                {'code_file': 'missing.ipynb'}):
        d = tmp_path / f'k{len(list(tmp_path.iterdir()))}'; d.mkdir()
        shutil.copy(NB, d / NB.name)
        meta = {**json.loads((KAGGLE / 'kernel-metadata.json').read_text()), **bad}
        (d / 'kernel-metadata.json').write_text(json.dumps(meta))
        rc, req, err = kaggle_validate(d, tmp_path)
        assert rc != 0 and req is None and 'ValueError' in err, f'{bad} was accepted: {err}'

def test_committed_notebook_is_clean():
    nb = json.loads(NB.read_text())
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    assert all(not c['outputs'] and c['execution_count'] is None for c in code)
    assert sum(''.join(c['source']).startswith('# parameters') for c in code) == 1
    secrets = ('"key"', 'KAGGLE_KEY=', 'KAGGLE_API_TOKEN=')
    for f in KAGGLE.iterdir():
        if f.is_file(): assert not any(s in f.read_text() for s in secrets), f'{f.name} looks like it holds a secret'

# --- the push script ----------------------------------------------------------------------------------------------
def test_push_dry_run(tmp_path):
    build = tmp_path / 'build'
    r = subprocess.run([sys.executable, str(KAGGLE / 'push.py'), '--dry-run', '--user', 'alice', '--no-internet',
                        '--resume-from-kernel', '--wait', '--output', str(tmp_path / 'out'), '--build-dir', str(build)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmds = [l[2:] for l in r.stdout.splitlines() if l.startswith('$ ')]
    order = ['pip wheel --no-deps', 'kaggle datasets status alice/codseg-wheel', 'kaggle datasets create',
             'kaggle kernels push -p', 'kaggle kernels status alice/codseg-train', 'kaggle kernels output']
    pos = [next((i for i, c in enumerate(cmds) if o in c), None) for o in order]
    assert None not in pos and pos == sorted(pos), cmds
    assert not (build / 'wheel').exists(), 'a dry run builds nothing'
    meta = json.loads((build / 'kernel' / 'kernel-metadata.json').read_text())
    assert meta['id'] == 'alice/codseg-train' and meta['enable_internet'] is False
    assert meta['dataset_sources'] == ['alice/cod10k-dataset', 'alice/codseg-wheel']
    assert meta['kernel_sources'] == ['alice/codseg-train']
    rc, req, err = kaggle_validate(build / 'kernel', tmp_path)  # what would be pushed passes validation too
    assert rc == 0 and req['slug'] == 'alice/codseg-train', err

def test_push_metadata_choices():
    meta = json.loads((KAGGLE / 'kernel-metadata.json').read_text())
    m = push.kernel_metadata(meta, 'bob', cod10k='carol/cod10k-v3', wheel='dave/wheels', internet=True)
    assert m['dataset_sources'] == ['carol/cod10k-v3', 'dave/wheels'] and m['enable_internet'] is True
    assert m['kernel_sources'] == [] and meta['id'].startswith(push.PLACEHOLDER), 'the input is left unchanged'
    w = push.wheel_metadata('bob/codseg-wheel')
    assert w['id'] == 'bob/codseg-wheel' and 6 <= len(w['title']) <= 50 and len(w['licenses']) == 1

RECIPE = ['--dataset', 'carol/cod10k-v3', '--dataset', 'dan/camo-dataset', '--dataset', 'erin/nc4k',
          '--dataset', 'erin/chameleon', '--dataset', 'frank/edgenext-weights',
          '--model', 'timm/edgenext/PyTorch/edgenext_base/1', '--model', 'gina/codseg-moe/PyTorch/v1/3']

def test_push_datasets_and_models(tmp_path):
    "Every input of the standard recipe attached by --dataset, weights by --model; what is staged passes validation."
    build = tmp_path / 'build'
    r = subprocess.run([sys.executable, str(KAGGLE / 'push.py'), '--dry-run', '--user', 'alice', '--skip-wheel', *RECIPE,
                        '--dataset', 'erin/nc4k', '--build-dir', str(build)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    meta = json.loads((build / 'kernel' / 'kernel-metadata.json').read_text())
    assert meta['dataset_sources'] == ['carol/cod10k-v3', 'dan/camo-dataset', 'erin/nc4k', 'erin/chameleon',
                                       'frank/edgenext-weights', 'alice/codseg-wheel']  # no placeholder, no repeat
    assert meta['model_sources'] == ['timm/edgenext/PyTorch/edgenext_base/1', 'gina/codseg-moe/PyTorch/v1/3']
    assert 'models timm/edgenext/PyTorch/edgenext_base/1' in r.stdout
    rc, req, err = kaggle_validate(build / 'kernel', tmp_path)
    assert rc == 0 and req['datasets'] == meta['dataset_sources'] and len(req['models']) == 2, err
    m = push.kernel_metadata(json.loads((KAGGLE / 'kernel-metadata.json').read_text()), 'bob', cod10k='c/cod',
                             datasets=['d/camo'])
    assert m['dataset_sources'] == ['c/cod', 'd/camo', 'bob/codseg-wheel'] and m['model_sources'] == []
    for bad in (['--model', 'timm/edgenext/PyTorch/base'], ['--dataset', 'no-owner']):
        r = subprocess.run([sys.executable, str(KAGGLE / 'push.py'), '--dry-run', '--user', 'a', *bad], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and 'is not of the form' in r.stderr, r.stderr

# --- the kernel notebook, headless on a fake /kaggle/input ---------------------------------------------------------
TINY = dict(backbone='edgenext_xx_small', pretrained=False, img_size=64, epochs=2, stage1_epochs=1, batch_size=4,
            accumulation_steps=1, num_workers=0, num_experts=2, seed=0)

def fake_kaggle(root: Path, n=16, previous: Path = None):
    "A fake `/kaggle/input` (the synthetic dataset in COD10K-v3 layout, optionally a previous session's output) and working dir."
    from codseg.synthetic import write_synthetic
    inp, work = root / 'input', root / 'working'
    write_synthetic(inp / 'cod10k-dataset' / 'COD10K-v3', n, 64, 0)
    if previous is not None: shutil.copytree(previous, inp / 'codseg-train')  # a session's whole output
    work.mkdir(parents=True)
    return inp, work

def snapshot(folder: Path) -> dict:
    "Every file under `folder` with its size and mtime (to prove nothing there was written)."
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob('*')) if p.is_file()}

def epochs_printed(out: str) -> list:
    "The epochs whose `Epoch N: Loss: ...` line the output holds."
    return [int(m) for m in re.findall(r'^Epoch (\d+): Loss: ', out, re.M)]

def run_kernel(inp: Path, work: Path, params: dict = None, **settings):
    "Execute the kernel notebook with execnb; the fake folders, `params` and `settings` injected into its parameters cell."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    nb = read_nb(NB)
    idx = next(i for i, c in enumerate(nb.cells) if c.cell_type == 'code' and c.source.startswith('# parameters'))
    inject = nb.cells[idx].source + (f'\nINPUT_ROOT = {str(inp)!r}\nWORKING_DIR = {str(work)!r}\n'
                                     f'SETTINGS = {settings!r}\n' + ''.join(f'{k} = {v!r}\n' for k, v in (params or {}).items()))
    sh = CaptureShell()
    try: sh.run_all(nb, exc_stop=True, inject_code=inject, inject_idx=idx)
    finally: write_nb(nb, work.parent / 'executed.ipynb')  # for a look after a failure
    out = '\n'.join(o.get('text', '') if isinstance(o.get('text', ''), str) else ''.join(o['text'])
                    for c in nb.cells for o in c.get('outputs', []))
    return sh, out

@pytest.fixture(scope='module')
def fresh(tmp_path_factory):
    "One tiny fresh session of the kernel: (input, working, shell, output text, input snapshot before)."
    root = tmp_path_factory.mktemp('fresh')
    inp, work = fake_kaggle(root)
    maps = inp/'sinet-v2-maps'/'COD10K'  # a method's released maps attached as a dataset: the masks, blurred
    maps.mkdir(parents=True)
    for g in (inp/'cod10k-dataset'/'COD10K-v3'/'Test'/'GT_Object').glob('*.png'):
        cv2.imwrite(str(maps/g.name), cv2.GaussianBlur(cv2.imread(str(g), cv2.IMREAD_GRAYSCALE), (9, 9), 3))
    before = snapshot(inp)
    sh, out = run_kernel(inp, work, {'PRED_DIRS': {'SINet-V2': str(inp/'sinet-v2-maps')}}, **TINY)
    return inp, work, sh, out, before

def test_kernel_runs_headless(fresh):
    inp, work, sh, out, before = fresh
    ck = work / 'checkpoints'
    for f in ('last.pth', 'best_model.pth', 'history.csv'): assert (ck / f).is_file(), f'{f} missing; output:\n{out}'
    assert list(ck.glob('*.png')), 'no curves plot'
    assert (work / 'lr_plan.png').is_file() and (work / 'lr_plan.csv').is_file()
    rows = (ck / 'history.csv').read_text().strip().splitlines()
    assert len(rows) == 1 + TINY['epochs'], rows
    res = work / 'results'
    table = (res / 'results.md').read_text()
    assert 'COD10K' in table and (res / 'eval_best_model.csv').is_file() and (res / 'eval_best_model.json').is_file()
    rows = (res / 'eval_best_model.csv').read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith('COD10K,4,'), rows  # the 4 synthetic test images, camouflaged only
    cmp = res / 'compare'  # PRED_DIRS: the released maps scored beside the checkpoint, tables and curves
    table = (cmp / 'results.md').read_text()
    assert 'SINet-V2' in table and 'best_model' in table and (cmp / 'pr_curves.png').is_file(), table
    assert 'starting a new run' in out and epochs_printed(out) == [1, 2], out
    check = sh.user_ns['check']  # data-check ran with the training settings and its JSON was read
    assert check['seed'] == TINY['seed'] == sh.user_ns['cfg'].seed and check['val_fraction'] == sh.user_ns['cfg'].val_fraction
    assert check['roles'] == {'COD10K-train': {'role': 'train', 'reason': "COD10K's Train split: trained on"},
                              'COD10K': {'role': 'test', 'reason': "COD10K's Test split (a test set of the field): evaluated, "
                                                                   'never trained on'}}
    assert check['train'] + check['val'] == 16 and check['test'] == {'COD10K': 4} and '--seed 0' in out
    assert snapshot(inp) == before, 'the kernel wrote inside its input folder'

def test_kernel_torchrun_flags(fresh):
    "The flags the two-GPU (torchrun) branch passes to `codseg train` reproduce the run's Config."
    import argparse
    from codseg.config import add_args, from_args
    ns = fresh[2].user_ns
    cfg, argv = ns['cfg'], ns['to_argv'](ns['cfg'])
    assert from_args(add_args(argparse.ArgumentParser()).parse_args(argv)) == cfg, argv

def test_kernel_resumes_on_two_processes(fresh, tmp_path):
    """The next session, with the first one's output attached, resumes from its last.pth; with two processes (as on
    Kaggle's two T4s; here gloo on CPU) training goes through torchrun with the flags the kernel builds."""
    inp, work = fake_kaggle(tmp_path, previous=fresh[1])
    before = snapshot(inp)
    sh, out = run_kernel(inp, work, params={'NPROC': 2}, **{**TINY, 'epochs': 3})
    last = inp / 'codseg-train' / 'checkpoints' / 'last.pth'
    assert f'resuming from {last}' in out and 'torch.distributed.run --standalone --nproc_per_node=2 -m codseg train' in out, out
    rows = (work / 'checkpoints' / 'history.csv').read_text().strip().splitlines()
    assert len(rows) == 1 + 3 and epochs_printed(out) == [3], out
    first = (fresh[1] / 'checkpoints' / 'history.csv').read_text().strip().splitlines()
    assert rows[:3] == first, 'the resumed history does not continue the first session\'s'
    best = work / 'checkpoints' / 'best_model.pth'  # carried over from the first session unless epoch 3 beat it
    import torch
    iou = lambda p: torch.load(p, map_location='cpu', weights_only=True)['best_iou']
    assert best.is_file() and iou(best) == iou(fresh[1] / 'checkpoints' / 'best_model.pth') == max(
        float(r.split(',')[3]) for r in rows[1:]), 'the best model of the first session was not kept'
    assert (work / 'results' / 'eval_best_model.csv').is_file() and (work / 'results' / 'results.md').is_file()
    assert snapshot(inp) == before, 'the kernel wrote inside its input folder'

def test_kernel_installs_from_wheel_dataset(tmp_path):
    """The install cell, in a Python where codseg is not importable but its requirements are (as on Kaggle),
    installs codseg offline from a wheel built as push.py builds it, found in an attached dataset."""
    import site
    wheels = tmp_path / 'input' / 'datasets' / 'someone' / 'codseg-wheel'
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w', str(wheels),
                        str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and list(wheels.glob('codseg-*.whl')), r.stderr
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=300)
    py = venv / 'bin' / 'python'
    sp = subprocess.run([py, '-c', 'import site; print(site.getsitepackages()[0])'], capture_output=True, text=True).stdout.strip()
    (Path(sp) / 'requirements-from-test.pth').write_text('\n'.join(site.getsitepackages()) + '\n')  # torch & co, not codseg
    nb = json.loads(NB.read_text())
    cell = next(''.join(c['source']) for c in nb['cells'] if 'def install_codseg' in ''.join(c['source']))
    code = f"INPUT_ROOT = {str(tmp_path / 'input')!r}\nCODSEG_SOURCE = 'no-network-here'\n" + cell
    r = subprocess.run([py, '-c', code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')})
    assert r.returncode == 0, r.stdout + r.stderr
    assert '--no-index --no-deps' in r.stdout and f'from {sp}/codseg' in r.stdout, r.stdout
