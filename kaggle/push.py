#!/usr/bin/env python3
"""Push the codseg Kaggle kernel: build the wheel, create or version the wheel dataset, push the kernel, report status.

Credentials come only from your own kaggle configuration (~/.kaggle/kaggle.json, $KAGGLE_CONFIG_DIR, or the
KAGGLE_USERNAME / KAGGLE_KEY / KAGGLE_API_TOKEN variables); this script never reads or prints a key.
Run `python kaggle/push.py --dry-run` to see what it would do.
"""
from __future__ import annotations
import argparse, json, shlex, shutil, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
META = 'kernel-metadata.json'
PLACEHOLDER = 'your-kaggle-username'  # owner written in the committed metadata; replaced by your username on push
EXTRA_WHEELS = ('pysodmetrics',)  # runtime requirements missing from Kaggle's image, shipped beside the wheel
DONE = ('complete', 'error', 'cancel')  # words of a finished kernel status


def kaggle_cmd() -> list:
    "The kaggle CLI as an argv prefix."
    return ['kaggle'] if shutil.which('kaggle') else [sys.executable, '-m', 'kaggle']


def kaggle_username(explicit: str | None) -> str | None:
    "`explicit`, else the username of your own kaggle configuration (None when there is none)."
    if explicit: return explicit
    import contextlib, io
    try:  # importing kaggle authenticates from your configuration; its help text is replaced by ours
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()): from kaggle import api
    except Exception: return None
    return getattr(api, 'config_values', {}).get('username')


def _owner(ref: str, user: str) -> str:
    "`ref` ('owner/slug') with the placeholder owner replaced by `user`."
    owner, _, slug = ref.partition('/')
    return f'{user}/{slug}' if owner == PLACEHOLDER else ref


def kernel_metadata(meta: dict, user: str, cod10k: str | None = None, wheel: str | None = None,
                    internet: bool | None = None, resume_kernel: str | None = None, datasets=(), models=()) -> dict:
    """The metadata to push: `meta` with your username, the chosen datasets (COD10K, then each of `datasets`, then the
    wheel; the committed COD10K placeholder is dropped when `datasets` are given), models, internet and resume source."""
    m = json.loads(json.dumps(meta))
    m['id'] = _owner(m['id'], user)
    src = [_owner(s, user) for s in m.get('dataset_sources', [])]
    first, wheel_ref = src[0], src[-1]
    if wheel: wheel_ref = wheel if '/' in wheel else f'{user}/{wheel}'
    first = cod10k or (None if datasets else first)
    m['dataset_sources'] = list(dict.fromkeys([*([first] if first else []), *datasets, wheel_ref]))
    m['model_sources'] = list(dict.fromkeys([*m.get('model_sources', []), *models]))
    if internet is not None: m['enable_internet'] = internet
    if resume_kernel: m['kernel_sources'] = sorted(set(m.get('kernel_sources', [])) | {_owner(resume_kernel, user)})
    return m


def check_ref(ref: str, parts: int, flag: str) -> str:
    "`ref` when it has `parts` non-empty parts separated by '/'; else exit naming `flag` and the form."
    if len(ref.split('/')) != parts or not all(ref.split('/')):
        form = 'OWNER/SLUG' if parts == 2 else 'OWNER/MODEL/FRAMEWORK/VARIATION/VERSION'
        why = ' (the kaggle CLI needs the version number too, e.g. .../1)' if parts == 5 and len(ref.split('/')) == 4 else ''
        sys.exit(f'push: {flag} {ref!r} is not of the form {form}{why}, as in its address on kaggle.com')
    return ref


def wheel_metadata(ref: str) -> dict:
    "dataset-metadata.json of the wheel dataset `ref` ('owner/slug')."
    return {'title': ref.split('/')[1], 'id': ref, 'licenses': [{'name': 'apache-2.0'}],
            'subtitle': 'codseg wheel for offline installs in Kaggle kernels'}


def stage_kernel(meta: dict, out: Path) -> Path:
    "Write `meta` and the kernel notebook into `out`, the folder `kaggle kernels push -p` uploads."
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(HERE / meta['code_file'], out / meta['code_file'])
    (out / META).write_text(json.dumps(meta, indent=2) + '\n')
    return out


def git_note() -> str:
    "A version note: the codseg version and the git commit."
    try: sha = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    except OSError: sha = ''
    from configparser import ConfigParser
    cfg = ConfigParser(); cfg.read(REPO / 'settings.ini')
    return f"codseg {cfg['DEFAULT']['version']} {sha}".strip()


class Runner:
    "Print each command; run it unless this is a dry run."
    def __init__(self, dry: bool): self.dry = dry
    def __call__(self, cmd, check=True, capture=False) -> subprocess.CompletedProcess:
        print('$', shlex.join(map(str, cmd)), flush=True)
        if self.dry: return subprocess.CompletedProcess(cmd, 0, '', '')
        r = subprocess.run(list(map(str, cmd)), text=True, capture_output=capture)
        if capture and r.stdout: print(r.stdout, end='')
        if check and r.returncode: sys.exit(f'push: `{shlex.join(map(str, cmd))}` failed (exit {r.returncode})')
        return r


def push_wheel(run: Runner, ref: str, build: Path, poll: float) -> None:
    "Build the codseg wheel (+ extra wheels) into `build` and create or version the dataset `ref`."
    if not run.dry: shutil.rmtree(build, ignore_errors=True); build.mkdir(parents=True)
    run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-w', build, REPO])
    run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '-d', build, *EXTRA_WHEELS])
    if not run.dry: (build / 'dataset-metadata.json').write_text(json.dumps(wheel_metadata(ref), indent=2))
    k = kaggle_cmd()
    exists = run([*k, 'datasets', 'status', ref], check=False, capture=True).returncode == 0
    if run.dry: print(f'# then `datasets version` if {ref} exists, else:')
    if exists and not run.dry: run([*k, 'datasets', 'version', '-p', build, '-m', git_note()])
    else: run([*k, 'datasets', 'create', '-p', build])
    out = wait_for(run, [*k, 'datasets', 'status', ref], ('ready', 'error'), poll, what=f'dataset {ref}', limit=1800)
    if not run.dry and 'ready' not in out: sys.exit(f'push: dataset {ref} is not ready ({out.strip()}); see kaggle.com/datasets/{ref}')


def wait_for(run: Runner, cmd, words, poll: float, what: str, limit: float = 3600) -> str:
    "Repeat `cmd` every `poll` seconds until its output contains one of `words`; returns that output."
    if run.dry: run(cmd); return ''
    t0 = time.time()
    while True:
        out = run(cmd, check=False, capture=True).stdout.lower()
        if any(w in out for w in words) or time.time() - t0 > limit: return out
        print(f'push: waiting for {what} ...', flush=True); time.sleep(poll)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='kaggle/push.py', description=__doc__.split('\n\n')[0])
    p.add_argument('--user', help='Kaggle username (default: from your kaggle configuration)')
    p.add_argument('--cod10k', metavar='OWNER/SLUG', help='COD10K dataset to attach (default: <user>/cod10k-dataset '
                   'unless --dataset is given)')
    p.add_argument('--dataset', action='append', default=[], metavar='OWNER/SLUG',
                   help='attach a dataset (repeatable): COD10K, CAMO, NC4K, CHAMELEON, backbone weights ...')
    p.add_argument('--model', action='append', default=[], metavar='OWNER/MODEL/FRAMEWORK/VARIATION/VERSION',
                   help='attach a Kaggle model (repeatable), e.g. backbone weights; the kaggle CLI needs the version')
    p.add_argument('--wheel-dataset', default='codseg-wheel', metavar='SLUG', help='dataset holding the codseg wheel')
    p.add_argument('--internet', action=argparse.BooleanOptionalAction, default=None,
                   help='turn the kernel\'s internet on or off (default: as in kernel-metadata.json)')
    p.add_argument('--resume-from-kernel', nargs='?', const='', metavar='OWNER/SLUG',
                   help="attach a kernel's output (default: this kernel's previous version) so training resumes from its last.pth")
    p.add_argument('--skip-wheel', action='store_true', help='push the kernel only; keep the wheel dataset as it is')
    p.add_argument('--no-run', action='store_true', help='save the kernel version without running it')
    p.add_argument('--accelerator', help='override machine_shape (e.g. NvidiaTeslaT4)')
    p.add_argument('--wait', action='store_true', help='poll the kernel status until the run finishes')
    p.add_argument('--output', metavar='DIR', help='with --wait: download the run\'s outputs into DIR')
    p.add_argument('--poll', type=float, default=60, help='seconds between status polls (default: 60)')
    p.add_argument('--build-dir', type=Path, default=HERE / 'build', help='staging folder (default: kaggle/build)')
    p.add_argument('--dry-run', action='store_true', help='print the commands and stage the metadata; upload nothing')
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    user = kaggle_username(a.user)
    if not user:
        if not a.dry_run: sys.exit('push: no Kaggle username: set up ~/.kaggle/kaggle.json (kaggle.com > Settings > '
                                   'API) or pass --user NAME')
        user = PLACEHOLDER
    meta = json.loads((HERE / META).read_text())
    resume = None if a.resume_from_kernel is None else (a.resume_from_kernel or meta['id'])
    datasets = [check_ref(d, 2, '--dataset') for d in a.dataset]
    models = [check_ref(m, 5, '--model') for m in a.model]
    meta = kernel_metadata(meta, user, a.cod10k, a.wheel_dataset, a.internet, resume, datasets, models)
    run, k = Runner(a.dry_run), kaggle_cmd()
    if a.dry_run: print('push: dry run: nothing is built or uploaded; the commands would be:')
    if not a.skip_wheel: push_wheel(run, meta['dataset_sources'][-1], a.build_dir / 'wheel', a.poll)
    folder = stage_kernel(meta, a.build_dir / 'kernel')
    models = f', models {", ".join(meta["model_sources"])}' if meta['model_sources'] else ''
    print(f'push: kernel staged in {folder} (id {meta["id"]}, datasets {", ".join(meta["dataset_sources"])}{models}, '
          f'internet {"on" if meta["enable_internet"] else "off"})')
    run([*k, 'kernels', 'push', '-p', folder, *(['--no-run'] if a.no_run else []),
         *(['--accelerator', a.accelerator] if a.accelerator else [])])
    status = [*k, 'kernels', 'status', meta['id']]
    if not a.wait: run(status, check=False); return 0
    out = wait_for(run, status, DONE, a.poll, what=f'kernel {meta["id"]}', limit=13 * 3600)
    if a.output: run([*k, 'kernels', 'output', meta['id'], '-p', a.output])
    return 0 if a.dry_run or 'complete' in out else 1


if __name__ == '__main__': sys.exit(main())
