"The package's layering: no import cycle between codseg's modules, function-level imports included."
import ast, re, subprocess, sys
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
    "Layouts, archives, roles, checks: each imports only the floors below it (and config, errors, flags, image)."
    g = graph()
    for i, m in enumerate(FINDING):
        allowed = {'config', 'errors', 'flags', 'image', *FINDING[:i]}
        allowed |= {'synthetic'} if m == 'roles' else set()  # --dataset-path synthetic
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
    assert g['runtime'] <= {'config', 'errors', 'data', 'model'}, g['runtime']  # below the learner and the trainer


def sources() -> dict[str, str]:
    return {m: (PKG/f'{m}.py').read_text() for m in MODULES}


def test_one_kaggle_input_root():
    "The Kaggle input folder is written in one place (config.kaggle_input_dir, which $CODSEG_KAGGLE_INPUT redirects)."
    homes = [m for m, s in sources().items() if "'/kaggle/input'" in s or '"/kaggle/input"' in s]
    assert homes == ['config'], homes


def test_one_weight_loader_and_one_run_assembly():
    "Checkpoint weights go into a model through runtime.load_weights alone; train and find-lr build their optimizer,"
    " loss, precision and step callbacks from codseg.parts; the learner decides no precision."
    src = sources()
    assert [m for m, s in src.items() if 'weights do not fit' in s] == ['runtime']
    assert [m for m, s in src.items() if 'model_state(' in s and '.load_state_dict(model_state' in s] == []
    for m in ('train', 'findlr'):
        assert 'parts' in imported(PKG/f'{m}.py') and 'AdamW(' not in src[m] and 'CODLoss(' not in src[m], m
    assert 'def pick_precision' in src['parts'] and 'pick_precision' not in src['learner']
    assert [m for m, s in src.items() if '2 * max(' in s] == ['parts']  # the validation batch size rule
    g = graph()
    assert 'parts' not in g['learner'] and 'train' not in g['parts'] and 'findlr' not in g['parts']


def str_constants(path: Path):
    "Every string constant in module file `path` (f-strings' literal parts included), with its line."
    return [(n.lineno, n.value) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_registries_own_their_names():
    ("The config, the floor argparse reads the choices from, imports no registry; no code types two names of a "
     "registry into one string (a message builds its list from the names); `make_loggers` names no logger.")
    import typing
    from codseg.config import LOGGERS, Loss, Monitor, Scheduler
    assert not graph()['config'] & {'schedule', 'losses', 'track'}, graph()['config']
    names = [typing.get_args(Scheduler), typing.get_args(Loss), typing.get_args(Monitor), LOGGERS]
    typed = [(p.name, line, s) for p in sorted(PKG.glob('*.py')) if p.name != '_modidx.py'
             for line, s in str_constants(p)
             for ns in names if sum(bool(re.search(rf'\b{n}\b', s)) for n in ns) >= 2]
    assert typed == [], f'choices typed out (build them from the registry or config names): {typed}'
    fn = next(n for n in ast.walk(ast.parse((PKG/'track.py').read_text()))
              if isinstance(n, ast.FunctionDef) and n.name == 'make_loggers')
    said = {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant)} & set(LOGGERS)
    assert not said, f'make_loggers special-cases {said}: open them from LOGGER_TYPES'


HEAVY = ('torch', 'timm', 'cv2', 'albumentations')


def imports_of(path: Path) -> set[str]:
    "The top-level names of every module that module file `path` imports anywhere in it (codseg's own included)."
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): out.update(a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0: out.add((node.module or '').split('.')[0])
    return out


def test_cli_is_the_top_floor():
    "No module imports codseg.cli but the entry points: the commands take their parsers from codseg.flags."
    g = graph()
    assert [m for m in g if 'cli' in g[m]] == [], {m: g[m] for m in g if 'cli' in g[m]}
    for m in ('train', 'evaluate', 'findlr', 'preview'): assert 'flags' in g[m], (m, g[m])
    assert 'cli' in imported(PKG/'__main__.py', MODULES | {'cli'})  # the one other importer


def test_flags_stay_light():
    "The parsers import only the settings and the error words, and loading them imports no heavy package."
    assert graph()['flags'] <= {'config', 'errors'}, graph()['flags']
    assert not imports_of(PKG/'flags.py') & set(HEAVY), imports_of(PKG/'flags.py')
    code = f'import sys, codseg.flags; print(sorted(m for m in {HEAVY!r} if m in sys.modules))'
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == '[]', r.stdout + r.stderr


def parser_misuse(path: Path) -> tuple[list[str], list[str]]:
    "(argparse's error handler patched, parsers built) in module file `path`, each as `line: code`."
    src, swaps, builds = path.read_text(), [], []
    where = lambda node: f'{node.lineno}: {ast.get_source_segment(src, node)}'
    for node in ast.walk(ast.parse(src)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        if any(isinstance(t, ast.Attribute) and 'ArgumentParser' in ast.unparse(t.value) for t in targets) or (
                isinstance(node, ast.Call) and ast.unparse(node.func) == 'setattr' and node.args
                and 'ArgumentParser' in ast.unparse(node.args[0])):
            swaps.append(where(node))
        elif isinstance(node, ast.Call) and ast.unparse(node.func).split('.')[-1] in ('ArgumentParser', 'Parser'):
            builds.append(where(node))
    return swaps, builds


def test_parsers_have_one_home(tmp_path):
    "argparse is never patched (no `ArgumentParser.error = ...`), and only codseg.flags builds parsers."
    (tmp_path/'m.py').write_text('import argparse\nargparse.ArgumentParser.error = print\n'
                                 'setattr(argparse.ArgumentParser, "error", print)\np = argparse.ArgumentParser()\n')
    swaps, builds = parser_misuse(tmp_path/'m.py')
    assert [s.split(':')[0] for s in swaps] == ['2', '3'] and [s.split(':')[0] for s in builds] == ['4']
    found = {p.name: parser_misuse(p) for p in PKG.glob('*.py')}
    assert {k: swaps for k, (swaps, _) in found.items() if swaps} == {}
    assert {k: builds for k, (_, builds) in found.items() if builds and k != 'flags.py'} == {}
    assert found['flags.py'][1], 'codseg.flags builds the parsers'
