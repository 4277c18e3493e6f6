#!/usr/bin/env python
"""Mutation testing for codseg's notebooks: apply one realistic mutant at a time, export, run its tests, print the score.

Each mutant in tools/mutants.toml names a notebook, an exact `old` code string (found exactly once in that notebook's
code cells), its `new` replacement and the tests to run (`nbs/NN_x.ipynb` runs `nbdev_test` on that notebook; anything
else is arguments to `python -m pytest -q -x`). For every mutant the repository is copied to a temporary folder (the
working tree is never touched), the mutant applied to the notebook there, `nbdev_export` run there, and the tests run
with PYTHONPATH pointing at the copy. A mutant is *caught* when a test run fails (or times out), *survived* when all
pass, *stale* when its `old` string is no longer found exactly once (fix the list; never counted). Mutants marked
`equivalent = true` cannot change behaviour: they are run only with --all and never counted.

    python tools/mutate.py                       # every mutant, one at a time
    python tools/mutate.py -j 2 -k schedule      # the mutants whose name contains 'schedule', two at a time
    python tools/mutate.py --list                # names, notebooks and tests
    python tools/mutate.py --baseline            # first check each test command passes on the unmutated code

Exit status: 0 when the score (caught / (caught + survived)) reaches --target (default 0.95), else 1."""
from __future__ import annotations
import argparse, json, os, re, shutil, subprocess, sys, tempfile, time, tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns('.git', '__pycache__', '*.pyc', '_proc', '_docs', '.pytest_cache', '*.egg-info', 'checkpoints')

def load(path: Path) -> list[dict]:
    "The mutants of list file `path`, each checked to have its fields."
    ms = tomllib.loads(path.read_text())['mutant']
    for m in ms:
        miss = {'name', 'notebook', 'old', 'new', 'tests'} - set(m)
        if miss: sys.exit(f'{path}: mutant {m.get("name", "?")} lacks {sorted(miss)}')
    names = [m['name'] for m in ms]
    if dup := {n for n in names if names.count(n) > 1}: sys.exit(f'{path}: duplicate mutant names {sorted(dup)}')
    return ms

def apply(nb: Path, old: str, new: str) -> str | None:
    "Replace `old` by `new` in the code cells of notebook `nb`; None when done, else why not (stale)."
    d = json.loads(nb.read_text())
    srcs = [(c, ''.join(c['source'])) for c in d['cells'] if c['cell_type'] == 'code']
    hits = [(c, s) for c, s in srcs if old in s]
    n = sum(s.count(old) for _, s in hits)
    if n != 1: return f'old string found {n} times in {nb.name}'
    c, s = hits[0]
    c['source'] = s.replace(old, new).splitlines(keepends=True)
    nb.write_text(json.dumps(d, indent=1, ensure_ascii=False) + '\n')
    return None

def commands(tests: list[str]) -> list[list[str]]:
    "The command of each test entry: nbdev_test for a notebook, pytest otherwise."
    out = []
    for t in tests:
        args = t.split()
        if len(args) == 1 and args[0].endswith('.ipynb'): out.append(['nbdev_test', '--path', args[0], '--n_workers', '0'])
        else: out.append([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', *args])
    return out

def env_for(copy: Path) -> dict:
    return {**os.environ, 'PYTHONPATH': str(copy), 'OMP_NUM_THREADS': '1', 'PYTHONDONTWRITEBYTECODE': '1'}

def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, str]:
    "('caught' | 'survived', detail) of running `tests` in `copy`."
    for cmd in commands(tests):
        try: r = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired: return 'caught', f'timeout ({timeout:.0f}s) in {" ".join(cmd[-4:])}'
        if r.returncode != 0:
            lines = [l.strip() for l in (r.stdout + r.stderr).splitlines() if l.strip()]
            tail = [l for l in lines if re.search(r'Error|assert|FAILED|Exception', l)][-1:] or lines[-1:] or ['']
            return 'caught', f'{" ".join(cmd[3:] if cmd[0] == sys.executable else cmd[2:3])}: {tail[0][:120]}'
    return 'survived', 'every test passed'

def trial(m: dict | None, tests: list[str], timeout: float) -> tuple[str, str, float]:
    "Copy the repository, apply mutant `m` (None: none), export, run `tests`: (outcome, detail, seconds)."
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix='codseg-mut-') as tmp:
        copy = Path(tmp)/'repo'
        shutil.copytree(ROOT, copy, ignore=SKIP)
        if m is not None:
            why = apply(copy/'nbs'/m['notebook'], m['old'], m['new'])
            if why: return 'stale', why, time.time() - t0
            r = subprocess.run(['nbdev_export'], cwd=copy, env=env_for(copy), capture_output=True, text=True)
            if r.returncode != 0: return 'caught', f'nbdev_export failed: {r.stderr.strip()[-120:]}', time.time() - t0
        out, detail = run_tests(copy, tests, timeout)
        return out, detail, time.time() - t0

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='tools/mutate.py', description=__doc__.split('\n\n')[0])
    p.add_argument('--mutants', type=Path, default=ROOT/'tools'/'mutants.toml', help='the mutant list (TOML)')
    p.add_argument('-k', action='append', default=[], metavar='TEXT', help='only mutants whose name contains TEXT (repeatable)')
    p.add_argument('-j', type=int, default=1, help='mutants run at a time (default 1)')
    p.add_argument('--timeout', type=float, default=600, help='seconds per test command; a timeout counts as caught')
    p.add_argument('--all', action='store_true', help='also run the mutants marked equivalent')
    p.add_argument('--baseline', action='store_true', help='first run each distinct test command on the unmutated code')
    p.add_argument('--list', action='store_true', help='list the mutants and exit')
    p.add_argument('--target', type=float, default=0.95, help='score to reach for exit status 0')
    a = p.parse_args(argv)
    ms = [m for m in load(a.mutants) if not a.k or any(k in m['name'] for k in a.k)]
    if a.list:
        for m in ms: print(f"{m['name']:<34} {m['notebook']:<20} {'(equivalent) ' if m.get('equivalent') else ''}{'; '.join(m['tests'])}")
        return 0
    if a.baseline:
        for t in sorted({t for m in ms for t in m['tests']}):
            out, detail, s = trial(None, [t], a.timeout)
            print(f"baseline {'ok  ' if out == 'survived' else 'FAIL'} {s:5.0f}s  {t}" + ('' if out == 'survived' else f'  {detail}'))
            if out != 'survived': print('A test fails without any mutant: fix it before counting mutants.'); return 1
    run = [m for m in ms if a.all or not m.get('equivalent')]
    equiv = [m for m in ms if m.get('equivalent')]
    res = {}
    def go(m):
        res[m['name']] = trial(m, m['tests'], a.timeout)
        out, detail, s = res[m['name']]
        print(f"{out.upper():<9}{s:5.0f}s  {m['name']:<34} {detail}", flush=True)
    with ThreadPoolExecutor(max(1, a.j)) as ex: list(ex.map(go, run))
    count = lambda o: sum(1 for m in run if not m.get('equivalent') and res[m['name']][0] == o)
    caught, survived, stale = count('caught'), count('survived'), count('stale')
    score = caught / max(caught + survived, 1)
    print(f'\n{caught} caught, {survived} survived, {stale} stale, {len(equiv)} equivalent (not counted): '
          f'score {caught}/{caught + survived} = {score:.0%}')
    for m in run:
        if res[m['name']][0] in ('survived', 'stale'): print(f"  {res[m['name']][0]}: {m['name']} ({m['notebook']})")
    for m in equiv: print(f"  equivalent: {m['name']}: {m.get('why', '')}")
    return 0 if score >= a.target and caught + survived else 1

if __name__ == '__main__': sys.exit(main())
