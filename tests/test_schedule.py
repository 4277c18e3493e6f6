"""`codseg lr-preview` end to end: its CSV against a straightforward reimplementation of SPEC section 4, its PNG."""
import csv, math, shlex, subprocess, sys
from dataclasses import asdict
from pathlib import Path

import pytest
from codseg.config import Config

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / 'docs' / 'lr-scheduler-guide.md'


# ---- SPEC section 4, written out as plainly as possible (no code shared with codseg.schedule) ----
def cos_anneal(a, b, p): return b + (a - b) * (1 + math.cos(math.pi * p)) / 2

def onecycle(s, N, peak, pct):
    low, final = peak / 25, peak / 25 / 1e4
    if N == 1: return peak
    if pct * N <= 1: return cos_anneal(peak, final, s / (N - 1))
    e1 = float(pct * N) - 1
    if s <= e1: return cos_anneal(low, peak, s / e1)
    return cos_anneal(peak, final, (s - e1) / (N - 1 - e1))

def restart(t, C0, m, P, lo):
    start, C = 0.0, C0
    while t >= start + C: start, C = start + C, C * m
    return cos_anneal(P, lo, (t - start) / C)

def stage_lr(kind, s, N, P, lo, W, pct, C0, m):
    if s < W: return lo + (P - lo) * s / W
    t, T = s - W, N - W
    if kind == 'onecycle': return onecycle(t, T, P, pct)
    if kind == 'cosine': return P if T == 1 else cos_anneal(P, lo, t / (T - 1))
    if kind == 'cosine_restart': return restart(t, C0, m, P, lo)
    return P

def spec_rows(flags: dict, n, world=1, origin=0):
    "(step, epoch, stage, lr, backbone_lr) per optimizer step of the plan SPEC section 4 describes."
    c = {**asdict(Config()), **flags}
    P2 = c['lr'] if c['stage2_lr'] is None else c['stage2_lr']
    b2 = c['batch_size'] if c['stage2_batch_size'] is None else c['stage2_batch_size']
    steps = lambda b: math.ceil(math.ceil(math.ceil(n / world) / b) / c['accumulation_steps'])
    S1, S2, E, E1 = steps(c['batch_size']), steps(b2), c['epochs'], c['stage1_epochs']
    first = lambda e: min(e, E1) * S1 + max(0, e - E1) * S2
    stages = []
    if origin < E1 and not c['skip_stage1']: stages.append((1, origin, E1, S1, c['stage1_scheduler'], c['lr'], 0))
    if max(origin, E1) < E: stages.append((2, max(origin, E1), E, S2, c['scheduler'], P2, c['warmup_epochs']))
    m, rows = c['t_mult'], []
    for stage, a, b, S, kind, P, we in stages:
        T0 = c['t0'] if c['t0'] else ((b - a) - we) / (1 + m + m ** 2)
        for s in range((b - a) * S):
            lr = stage_lr(kind, s, (b - a) * S, P, c['min_lr'], we * S, c['pct_start'], T0 * S, m)
            rows.append((first(a) + s, a + s // S + (s % S) / S, stage, lr, lr * c['backbone_lr_mult'] if stage == 2 else 0.0))
    return rows


# ---- running the command ----
def lr_preview(argv, tmp_path, png=False):
    "Run `python -m codseg lr-preview argv --csv ...`; return (stdout, CSV rows)."
    out = tmp_path / 'plan.csv'
    cmd = [sys.executable, '-m', 'codseg', 'lr-preview', *argv, '--csv', str(out)] + (['--png', str(tmp_path / 'plan.png')] if png else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(out) as f:
        rd = csv.reader(f)
        assert next(rd) == ['step', 'epoch', 'stage', 'lr', 'backbone_lr']
        return r.stdout, [(int(s), float(e), int(st), float(lr), float(b)) for s, e, st, lr, b in rd]

def assert_same(got, want):
    assert len(got) == len(want), (len(got), len(want))
    for g, w in zip(got, want):
        assert g[0] == w[0] and g[2] == w[2], (g, w)
        for x, y in zip(g[1:], w[1:]):
            assert x == y or math.isclose(x, y, rel_tol=1e-12, abs_tol=0), (g, w)


# ---- the guide's four scenarios, as written in the guide ----
def guide_argv():
    "The four `python train_ultimate.py train` commands of the guide, as argv lists."
    text = GUIDE.read_text()
    blocks = [b.split('```')[0] for b in text.split('```bash\n')[1:]]
    return [shlex.split(b.replace('\\\n', ' '))[3:] for b in blocks if b.startswith('python train_ultimate.py train')]

BASE = dict(batch_size=2, stage2_batch_size=1, accumulation_steps=4, stage1_epochs=30, lr=0.00025)
SCENARIOS = [  # (the guide's flags, the extra preview flags, the resume epoch)
    (dict(BASE, epochs=120, stage2_lr=0.0002, scheduler='cosine', min_lr=0.00001, warmup_epochs=3), [], 0),
    (dict(BASE, epochs=150, stage2_lr=0.0003, scheduler='cosine', min_lr=0.00001, skip_stage1=True), ['--resume-epoch', '86'], 86),
    (dict(BASE, epochs=120, stage2_lr=0.00025, scheduler='cosine_restart', min_lr=0.00001, warmup_epochs=5, t_mult=2), [], 0),
    (dict(BASE, epochs=140, stage2_lr=0.0005, scheduler='cosine', min_lr=0.00005, skip_stage1=True), ['--resume-epoch', '86'], 86),
]

@pytest.mark.parametrize('i', range(4))
def test_guide_scenarios(i, tmp_path):
    argv = guide_argv()
    assert len(argv) == 4
    flags, extra, origin = SCENARIOS[i]
    out, rows = lr_preview(argv[i] + ['--train-size', '3040'] + extra, tmp_path, png=i == 2)
    want = spec_rows(flags, 3040, origin=origin)
    assert_same(rows, want)
    if i == 0:  # the guide: 0.0002 at the end of the 3 warmup epochs, 0.00001 at the end
        at = {r[0]: r for r in rows}
        assert math.isclose(at[30 * 380 + 3 * 760][3], 0.0002, rel_tol=1e-12) and rows[-1][3] == 0.00001
    if origin: assert 'Re-planned from Epoch 87' in out and rows[0][1] == 86.0
    if i == 2: check_png(tmp_path / 'plan.png')

def check_png(path):
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == 'PNG' and im.size[0] > 400 and im.size[1] > 200
        im.verify()


# ---- edge cases ----
EDGES = {  # name: (flags for the reference, train size, world size, resume epoch)
    'accumulation does not divide the stages': (dict(epochs=5, stage1_epochs=2, batch_size=2, stage2_batch_size=3,
        accumulation_steps=3, scheduler='cosine', warmup_epochs=1, min_lr=1e-5), 37, 1, None),
    'one-epoch stages of one step': (dict(epochs=2, stage1_epochs=1, batch_size=8, accumulation_steps=4), 8, 1, None),
    'one-epoch stages of three steps': (dict(epochs=2, stage1_epochs=1, batch_size=2, accumulation_steps=4,
        scheduler='cosine', stage1_scheduler='cosine'), 24, 1, None),
    'skip-stage1': (dict(epochs=8, stage1_epochs=3, skip_stage1=True, scheduler='cosine_restart', warmup_epochs=1,
        min_lr=1e-5), 50, 1, None),
    'restarts with t0 and t_mult 3': (dict(epochs=14, stage1_epochs=2, scheduler='cosine_restart', t0=1.5, t_mult=3,
        min_lr=2e-6), 90, 1, None),
    'onecycle after warmup, tiny pct_start': (dict(epochs=6, stage1_epochs=2, scheduler='onecycle', warmup_epochs=2,
        pct_start=0.01, stage2_lr=1e-3), 64, 1, None),
    'none, two processes': (dict(epochs=4, stage1_epochs=1, scheduler='none', stage1_scheduler='none',
        stage2_batch_size=3), 101, 2, None),
    'resume in Stage 2, changed settings': (dict(epochs=12, stage1_epochs=3, scheduler='cosine_restart', t_mult=1,
        warmup_epochs=2, min_lr=1e-5), 70, 1, 5),
    'resume in Stage 1, changed settings': (dict(epochs=9, stage1_epochs=4, stage1_scheduler='cosine',
        scheduler='onecycle', warmup_epochs=1, min_lr=1e-6), 70, 1, 1),
    'resume in Stage 1 with --skip-stage1': (dict(epochs=9, stage1_epochs=4, skip_stage1=True, scheduler='cosine',
        warmup_epochs=2), 70, 1, 2),
}

def to_argv(flags: dict) -> list:
    out = []
    for k, v in flags.items():
        f = '--' + k.replace('_', '-')
        out += [f] if v is True else [] if v is False else [f, str(v)]
    return out

@pytest.mark.parametrize('name', list(EDGES))
def test_edge_cases(name, tmp_path):
    flags, n, world, origin = EDGES[name]
    argv = to_argv(flags) + ['--train-size', str(n), '--world-size', str(world)]
    if origin is not None: argv += ['--resume-epoch', str(origin)]
    _, rows = lr_preview(argv, tmp_path)
    assert_same(rows, spec_rows(flags, n, world, origin or 0))


# ---- resume from a checkpoint: unchanged settings continue the same plan, changed ones re-plan ----
def test_resume_from_checkpoint(tmp_path):
    torch = pytest.importorskip('torch')
    from codseg.schedule import make_plan
    old = dict(epochs=10, stage1_epochs=3, scheduler='cosine', warmup_epochs=1, min_lr=1e-5)
    plan = make_plan(Config(**old), 70)
    ck = tmp_path / 'last.pth'
    torch.save({'plan': plan.to_dict(), 'epoch': 6, 'global_step': plan.first_step(6), 'model': {}}, ck)
    base = ['--train-size', '70', '--resume-from', str(ck)]
    out, rows = lr_preview(to_argv(old) + base, tmp_path, png=True)
    assert 'identical curve' in out
    assert_same(rows, spec_rows(old, 70))
    check_png(tmp_path / 'plan.png')
    new = dict(old, scheduler='cosine_restart', stage2_lr=5e-4)
    out, rows = lr_preview(to_argv(new) + base, tmp_path)
    assert '--scheduler cosine -> cosine_restart' in out and 'Re-planned from Epoch 7' in out
    assert_same(rows, spec_rows(new, 70, origin=6))


def test_refusals(tmp_path):
    for argv, msg in [(['--lr', '-0.0001'], '--lr -0.0001 is not a learning rate'),
                      (['--min-lr', '1e-3', '--scheduler', 'cosine'], '--min-lr 0.001 is above the Stage-2 peak'),
                      (['--warmup-epochs', '90'], '--warmup-epochs 90 is not shorter than Stage 2'),
                      (['--stage1-epochs', '130'], '--stage1-epochs 130 is above --epochs 120'),
                      (['--t-mult', '0', '--scheduler', 'cosine_restart'], '--t-mult 0 is below 1')]:
        r = subprocess.run([sys.executable, '-m', 'codseg', 'lr-preview', '--train-size', '3040', *argv],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr, (argv, r.stderr)


# ---- one LR path: the CSV is what the trainer's LRPlanCB puts in the optimizer ----
@pytest.mark.parametrize('i', [0, 1, 2])
def test_csv_equals_the_optimizer(i, tmp_path):
    "The optimizer's LR per group, as LRPlanCB sets it at sampled steps, equals `lr-preview --csv` for the guide."
    torch = pytest.importorskip('torch')
    from types import SimpleNamespace
    from codseg.learner import LRPlanCB
    from codseg.schedule import make_plan
    flags, extra, origin = SCENARIOS[i]
    _, rows = lr_preview(guide_argv()[i] + ['--train-size', '3040'] + extra, tmp_path)
    plan = make_plan(Config(**flags), 3040, origin=origin)
    groups = [{'params': [torch.nn.Parameter(torch.zeros(1))], 'kind': k} for k in ('decoder', 'backbone', 'decoder')]
    opt, cb = torch.optim.AdamW(groups, lr=1.0), LRPlanCB(plan.lr)
    for r in rows[::997] + rows[-1:]:
        cb.before_step(SimpleNamespace(step_idx=r[0], opt=opt))
        assert [g['lr'] for g in opt.param_groups] == [r[3], r[4], r[3]], r

def test_csv_reads_plan_lr(tmp_path, monkeypatch):
    "write_csv takes both columns from Plan.lr (the trainer's function), so a change there is a change in the CSV."
    from codseg.preview import write_csv
    from codseg.schedule import Plan, make_plan
    plan = make_plan(Config(epochs=4, stage1_epochs=1, scheduler='cosine', warmup_epochs=1), 40)
    real, asked = Plan.lr, []
    def half_backbone(self, step):
        asked.append(step)
        d, b = real(self, step)
        return d, b / 2
    monkeypatch.setattr(Plan, 'lr', half_backbone)
    rows = [l.split(',') for l in write_csv(plan, tmp_path / 'p.csv').read_text().splitlines()[1:]]
    assert asked == list(range(plan.end_step)) and len(rows) == plan.end_step
    assert all(float(r[4]) == real(plan, int(r[0]))[1] / 2 and float(r[3]) == real(plan, int(r[0]))[0] for r in rows)


# ---- the notebook widget: driven headless, its settings and curve are the CLI's ----
def test_widget_matches_cli(tmp_path):
    "Setting the widget's controls as flags gives the Config the CLI resolves and the CSV lr-preview writes."
    pytest.importorskip('ipywidgets')
    import matplotlib
    matplotlib.use('Agg')
    from codseg.config import from_args
    from codseg.flags import lr_preview_parser
    from codseg.preview import WIDGET_FIELDS, lr_widget, write_csv
    from codseg.schedule import make_plan, plan_settings
    w = lr_widget(Config(epochs=10, stage1_epochs=2), n_train=120, static=True)
    values = dict(lr=3e-4, batch_size=4, scheduler='cosine_restart', stage1_scheduler='cosine', min_lr=2e-6,
                  warmup_epochs=1, t_mult=1, accumulation_steps=3, backbone_lr_mult=0.2, pct_start=0.3)
    for n, v in values.items(): w.children[WIDGET_FIELDS.index(n)].value = v
    argv = ['--epochs', '10', '--stage1-epochs', '2', '--train-size', '120'] + to_argv(values)
    cli = from_args(lr_preview_parser().parse_args(argv))
    assert w.result is not None and plan_settings(w.result) == plan_settings(cli)
    assert (cli.stage2_lr, cli.stage2_batch_size) == (None, None)  # the CLI leaves them to --lr and --batch-size
    plan = make_plan(w.result, 120)  # what the widget draws
    assert plan.segments[1].peak == 3e-4 and plan.batch_size(5) == 4
    _, rows = lr_preview(argv, tmp_path)
    assert write_csv(plan, tmp_path / 'w.csv').read_text() == (tmp_path / 'plan.csv').read_text()
    w.children[WIDGET_FIELDS.index('stage2_batch_size')].value = 2  # as --stage2-batch-size 2
    _, rows2 = lr_preview(argv + ['--stage2-batch-size', '2'], tmp_path)
    assert write_csv(make_plan(w.result, 120), tmp_path / 'w.csv').read_text() == (tmp_path / 'plan.csv').read_text()
    assert len(rows2) > len(rows)


def test_widget_replans_from_the_checkpoint_the_run_resumes(tmp_path, ckpt, capsys):
    "Given a config that resumes, the widget draws the plan the run re-makes from that checkpoint, as lr-preview."
    pytest.importorskip('ipywidgets')
    import matplotlib
    matplotlib.use('Agg')
    from codseg.preview import WIDGET_FIELDS, lr_widget, preview_plan, read_resume
    cfg = Config(epochs=6, stage1_epochs=1, stage2_lr=5e-4, resume_from=str(ckpt))
    w = lr_widget(cfg, n_train=120, static=True)
    capsys.readouterr()
    w.children[WIDGET_FIELDS.index('min_lr')].value = 1e-5  # a change: the widget redraws and prints the plan
    shown = capsys.readouterr().out
    want = preview_plan(w.result, 120, 1, checkpoint=read_resume(ckpt)).summary()
    assert want in shown and 'Re-planned from Epoch' in want, shown  # from the epoch the checkpoint finished
    from codseg.schedule import make_plan
    fresh = make_plan(w.result, 120).summary()
    assert fresh not in shown
    out, _ = lr_preview(list(map(str, ['--epochs', 6, '--stage1-epochs', 1, '--stage2-lr', 5e-4, '--min-lr', 1e-5,
                                       '--train-size', 120, '--resume-from', ckpt])), tmp_path)
    assert want in out  # lr-preview --resume-from prints the same plan
