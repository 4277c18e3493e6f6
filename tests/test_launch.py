"""Launch from anywhere (issue 23.7): `python -m codseg` and `torchrun -m codseg` from the folder holding a clone named
codseg, whose root (no __init__.py) Python finds first, as an empty namespace package. The clone is installed with
`pip install -e` into a virtual environment (this environment's site-packages for torch and the rest, nothing
downloaded), once as setup.py says ('pth': the project folder on sys.path) and once with setuptools' import hook (setup.py without its
package_dir line, as before the fix: the hook comes after the namespace folder)."""
import configparser, os, shutil, signal, socket, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
_cfg = configparser.ConfigParser(delimiters=['='])
_cfg.read(ROOT/'settings.ini')
VERSION = _cfg['DEFAULT']['version']
TINY = ['--dataset-path', 'synthetic', '--synthetic-n', '16', '--synthetic-size', '64', '--img-size', '64',
        '--backbone', 'edgenext_xx_small', '--no-pretrained', '--num-experts', '3', '--batch-size', '8',
        '--num-workers', '0', '--device', 'cpu', '--epochs', '1', '--stage1-epochs', '1']


def run(cmd, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    "Run `cmd` in `cwd` in its own process group, killed whole after `timeout` s."
    p = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try: out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module', params=['pth', 'hook'])
def clone(request, tmp_path_factory):
    "(python of a venv with the clone installed editable, the clone's parent folder, environment, mode)."
    tmp = tmp_path_factory.mktemp(f'launch-{request.param}')
    repo = tmp/'parent'/'codseg'
    repo.mkdir(parents=True)
    for f in ('setup.py', 'settings.ini', 'pyproject.toml', 'README.md'): shutil.copy(ROOT/f, repo/f)
    shutil.copytree(ROOT/'codseg', repo/'codseg', ignore=shutil.ignore_patterns('__pycache__'))
    if request.param == 'hook':
        s = (repo/'setup.py').read_text()
        assert "    package_dir={'': '.'},\n" in s
        (repo/'setup.py').write_text(s.replace("    package_dir={'': '.'},\n", ''))
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONSAFEPATH')}
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', CODSEG_CACHE=str(tmp/'cache'), PIP_NO_INDEX='1',
               GLOO_SOCKET_IFNAME='lo', MASTER_ADDR='127.0.0.1')
    venv = tmp/'venv'
    r = run([sys.executable, '-m', 'venv', '--without-pip', venv], tmp, env, 120)
    assert r.returncode == 0, r.stderr
    py = venv/'bin'/'python'
    # torch and the rest from this environment's site-packages, as plain path entries: their .pth files (another
    # codseg's editable install among them) are not run, so only the clone's own install decides what codseg is
    r = run([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], tmp, env, 60)
    outer = [p for p in sys.path if p.endswith('site-packages') and Path(p).is_dir()]
    (Path(r.stdout.strip())/'outer-site-packages.pth').write_text('\n'.join(outer) + '\n')
    r = run([py, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation', '-e', repo], tmp, env, 300)
    if r.returncode: pytest.skip(f'pip install -e did not run here: {r.stderr[-500:]}')
    return py, repo.parent, env, request.param


def test_import_from_the_parent_folder(clone):
    "With the fixed setup.py `import codseg` from the clone's parent gets the package; the hook gets the folder."
    py, parent, env, mode = clone
    r = run([py, '-c', 'import codseg; print(codseg.__file__, hasattr(codseg, "__version__"))'], parent, env, 120)
    assert r.returncode == 0, r.stderr
    want = f"{parent/'codseg'/'codseg'/'__init__.py'} True" if mode == 'pth' else 'None False'  # the hook: shadowed
    assert r.stdout.strip() == want


def test_python_m_codseg_from_the_parent_folder(clone, tmp_path):
    "`python -m codseg --help`, `--version` and a one-epoch train work there; the checkpoint holds the version."
    py, parent, env, mode = clone
    r = run([py, '-m', 'codseg', '--help'], parent, env, 120)
    assert r.returncode == 0 and 'lr-preview' in r.stdout, r.stderr
    r = run([py, '-m', 'codseg', '--version'], parent, env, 120)
    assert r.returncode == 0 and r.stdout.strip() == VERSION, r.stderr
    note = f"the folder {(parent/'codseg').resolve()} shadows the installed codseg"
    assert (note in r.stderr) == (mode == 'hook'), r.stderr  # the note names the folder where it shadows
    r = run([py, '-m', 'codseg', 'train', *TINY, '--checkpoint-dir', tmp_path/'ck'], parent, env, 300)
    assert r.returncode == 0 and 'Epoch 1:' in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    ck = run([py, '-c', f"import torch; print(torch.load({str(tmp_path/'ck'/'last.pth')!r}, weights_only=True)"
                        "['codseg'])"], tmp_path, env, 120)
    assert ck.stdout.strip() == VERSION, ck.stderr


def test_torchrun_m_codseg_from_the_parent_folder(clone):
    "`torchrun -m codseg --version` with two processes: each one runs the installed package."
    py, parent, env, mode = clone
    r = run([py, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc-per-node', '2', '--master-addr',
             '127.0.0.1', '--master-port', free_port(), '-m', 'codseg', '--version'], parent, env, 180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [VERSION, VERSION], r.stdout
