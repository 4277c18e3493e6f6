"The package's layering: no import cycle between codseg's modules, function-level imports included."
import ast, subprocess, sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1]/'codseg'
MODULES = {p.stem for p in PKG.glob('*.py')} - {'__init__', '__main__', '_modidx'}


def imported(path: Path, modules=MODULES) -> set[str]:
    "The codseg `modules` that module file `path` imports anywhere in it (top level, functions, try blocks)."
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or '').split('.')
            if node.level == 1 or parts[0] == 'codseg':
                rest = parts[1:] if parts[0] == 'codseg' else [p for p in parts if p]
                out.update(rest[:1] if rest else [a.name for a in node.names])  # `from . import x`: x
        elif isinstance(node, ast.Import):
            out.update(a.name.split('.')[1] for a in node.names if a.name.startswith('codseg.'))
    return out & modules


def graph() -> dict[str, set[str]]:
    return {m: imported(PKG/f'{m}.py') - {m} for m in sorted(MODULES)}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    "One import cycle through each module that is on one (depth-first search)."
    found, state = [], {}
    def visit(m, stack):
        state[m] = 'open'
        for n in sorted(g[m]):
            if state.get(n) == 'open': found.append(stack[stack.index(n):] + [n])
            elif n not in state: visit(n, stack + [n])
        state[m] = 'done'
    for m in g:
        if m not in state: visit(m, [m])
    return found


def test_the_checker_finds_cycles(tmp_path):
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c', 'a']]
    assert cycles({'a': {'b'}, 'b': set()}) == []
    (tmp_path/'m.py').write_text('from .x import y\nfrom codseg.data import z\nimport numpy\n'
                                 'def f():\n    from codseg import layout\n    import codseg.cache\n')
    assert imported(tmp_path/'m.py', MODULES | {'x'}) == {'x', 'data', 'layout', 'cache'}


def test_no_import_cycle():
    g = graph()
    assert {'image', 'layout', 'archives', 'roles', 'checks', 'cache', 'data'} <= set(g)
    assert cycles(g) == [], f'import cycles in codseg/: {cycles(g)}'


def test_data_layers():
    "Reading files is the bottom layer; finding a dataset never imports the datasets and loaders."
    g = graph()
    assert g['image'] == set() and 'data' not in g['layout'] and 'data' not in g['cache']
    assert {'image', 'layout', 'cache'} <= g['data']


FINDING = ('layout', 'archives', 'roles', 'checks')  # finding a dataset, lowest floor first (01, 01a, 01b, 01c)


def test_finding_a_dataset_is_four_floors():
    "Layouts, archives, roles, checks: each imports only the floors below it (and config, errors, image), never data."
    g = graph()
    for i, m in enumerate(FINDING):
        allowed = {'config', 'errors', 'image', *FINDING[:i]} | ({'synthetic'} if m == 'roles' else set())  # --dataset-path synthetic
        assert g[m] <= allowed, (m, g[m] - allowed)
    assert 'layout' in g['archives'] and 'archives' in g['roles'] and 'roles' in g['checks']


def test_layout_stays_light():
    "`codseg data-check` and `lr-preview` find a dataset without torch or albumentations (seconds saved per call)."
    code = 'import sys, codseg.checks; print(sorted(m for m in ("torch", "albumentations") if m in sys.modules))'
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == '[]', r.stdout + r.stderr


def test_evaluate_and_findlr_import_nothing_from_train():
    "Evaluation and find-lr stand on codseg.runtime (device, seeding, checkpoints), not on the trainer."
    g = graph()
    assert 'runtime' in g['evaluate'] and 'runtime' in g['findlr'] and 'runtime' in g['train']
    assert 'train' not in g['evaluate'] and 'train' not in g['findlr'], (g['evaluate'], g['findlr'])
    assert g['runtime'] <= {'config', 'errors', 'model'}, g['runtime']  # below the learner and the trainer
