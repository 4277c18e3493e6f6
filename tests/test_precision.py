"Precision per GPU (faked device properties), the fp16 + GradScaler path on CPU, and host reads per step."
import traceback
from dataclasses import replace
from types import SimpleNamespace
import pytest
import torch
from codseg.config import Config
from codseg.parts import pick_precision
from codseg.train import train

GPUS = {  # name: (compute capability, what auto picks)
    'Tesla T4': ((7, 5), 'fp16'), 'Tesla P100-PCIE-16GB': ((6, 0), 'fp16'), 'Tesla V100-SXM2-16GB': ((7, 0), 'fp16'),
    'NVIDIA A100-SXM4-40GB': ((8, 0), 'bf16'), 'NVIDIA H100 80GB HBM3': ((9, 0), 'bf16')}
DTYPE = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': None}
TINY = dict(dataset_path='synthetic', synthetic_n=24, synthetic_size=48, img_size=48, backbone='edgenext_xx_small',
            pretrained=False, num_experts=3, epochs=2, stage1_epochs=1, batch_size=4, accumulation_steps=2,
            lr=2e-3, num_workers=0, scheduler='cosine')

def fake_gpu(monkeypatch, name, cap):
    "Make torch.cuda report one GPU `name` of capability `cap`; bf16 'supported' (by emulation, as torch says on a T4)."
    props = SimpleNamespace(name=name, major=cap[0], minor=cap[1], total_memory=16 * 2**30, multi_processor_count=40)
    for k, v in dict(is_available=lambda: True, device_count=lambda: 1, set_device=lambda d: None, current_device=lambda: 0,
                     get_device_properties=lambda d=None: props, get_device_capability=lambda d=None: cap,
                     get_device_name=lambda d=None: name, is_bf16_supported=lambda *a, **k: True).items():
        monkeypatch.setattr(torch.cuda, k, v)

@pytest.mark.parametrize('name', GPUS)
def test_auto_precision_per_gpu(monkeypatch, name):
    cap, want = GPUS[name]
    fake_gpu(monkeypatch, name, cap)
    dtype, why = pick_precision('cuda')
    assert dtype == DTYPE[want] and why.startswith(want) and name in why and f'{cap[0]}.{cap[1]}' in why
    assert pick_precision('cuda:0', 'fp32')[0] is None and pick_precision('cuda', 'fp16')[0] == torch.float16

@pytest.mark.parametrize('name', GPUS)
def test_dry_run_prints_the_choice(monkeypatch, tmp_path, name):
    cap, want = GPUS[name]
    fake_gpu(monkeypatch, name, cap)
    said = []
    train(Config(**TINY, device='cuda', dry_run=True, checkpoint_dir=str(tmp_path/'ck')), say=said.append)
    line = next(l for l in '\n'.join(said).splitlines() if l.startswith('Precision: '))
    assert line.startswith(f'Precision: {want}') and name in line and f'capability {cap[0]}.{cap[1]}' in line, line
    assert not (tmp_path/'ck').exists()

@pytest.mark.parametrize('name', [n for n, (c, w) in GPUS.items() if w == 'fp16'])
def test_bf16_asked_on_an_old_gpu_is_refused(monkeypatch, capsys, name):
    fake_gpu(monkeypatch, name, GPUS[name][0])
    from codseg.cli import main  # errors become one line and an exit status there
    rc = main(['train', '--dataset-path', 'synthetic', '--device', 'cuda', '--precision', 'bf16', '--dry-run', '--no-pretrained',
                    '--backbone', 'edgenext_xx_small'])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and '--precision fp16' in err and name in err, err

def test_no_amp_is_fp32(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, 'NVIDIA A100-SXM4-40GB', (8, 0))
    said = []
    train(Config(**TINY, device='cuda', amp=False, dry_run=True, checkpoint_dir=str(tmp_path/'ck')), say=said.append)
    assert 'Precision: fp32' in '\n'.join(said)
    assert pick_precision('cpu') == (None, 'fp32 (auto): cpu has no fast mixed precision for training')

def run(tmp_path, name, quiet=True, **kw):
    "Train TINY (fp16 autocast with an enabled GradScaler, on CPU) into `tmp_path/name`; the summary and last.pth."
    r = train(Config(**{**TINY, 'device': 'cpu', 'precision': 'fp16', **kw}, checkpoint_dir=str(tmp_path/name)),
              say=(lambda *a, **k: None) if quiet else print)
    return r, torch.load(tmp_path/name/'last.pth', weights_only=True)

def test_fp16_scaler_resumes_exactly(tmp_path):
    "The fp16 path on CPU (a real, enabled GradScaler): its state is saved and resumed exactly, so is the run."
    _, a = run(tmp_path, 'straight')
    _, mid = run(tmp_path, 'split', stop_after=1)
    assert mid['scaler'] and mid['scaler']['scale'] > 0
    _, b = run(tmp_path, 'split', resume_from='auto')
    assert a['scaler'] == b['scaler'] and a['scaler']['_growth_tracker'] > 0
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])

def test_fp16_without_clipping(tmp_path):
    "--grad-clip 0 on the fp16 path: no clipping, the run trains and its steps are taken."
    r, c = run(tmp_path, 'noclip', grad_clip=0.0)
    assert len(r['history']) == 2 and c['scaler']['_growth_tracker'] > 0

def test_fp16_overflows_are_counted_not_divergence(tmp_path):
    "A scale so high the first steps overflow: they are skipped, counted, reported; the run goes on (patience 1)."
    from codseg.learner import Callback
    class HugeScale(Callback):
        order = -5  # after AMPCB made the scaler
        def before_fit(self, learn):
            learn.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 120)
            guard = next(cb for cb in learn.cbs if type(cb).__name__ == 'GradGuardCB')
            guard.patience = 1  # overflows are no divergence: even one non-finite step in a row would stop the run
    said = []
    r = train(Config(**TINY, device='cpu', precision='fp16', checkpoint_dir=str(tmp_path/'of')), callbacks=[HugeScale()],
              say=lambda s, **k: said.append(s))
    h = r['history'][-1]
    assert h['overflow_steps'] >= 1 and h['skipped_steps'] == h['overflow_steps'] and r['stopped'] is None
    assert 'fp16 overflows)' in '\n'.join(said)

SYNCS = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__', '__index__')

@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_one_host_read_per_step(monkeypatch, tmp_path, precision):
    "The trainer's batches and steps (data loading aside) read the device at most once per optimizer step."
    from codseg.learner import Callback
    count = {'on': False, 'syncs': 0, 'steps': 0, 'where': []}
    class On(Callback):
        order = -10 ** 6
        def before_batch(self, learn): count['on'] = learn.training
        before_step = before_batch
    class Off(Callback):
        order = 10 ** 6
        def after_batch(self, learn): count['on'] = False
        after_cancel_batch = after_batch
        def after_step(self, learn): count['on'] = False; count['steps'] += 1
        after_cancel_step = after_step
    def counting(name, f):
        def g(self, *a, **k):
            st = traceback.extract_stack(limit=3)[0]
            # torch's optimizers keep their step counters on the host on every device (unless capturable/fused):
            # reading those reads no device
            if count['on'] and '/torch/optim/' not in st.filename:
                count['syncs'] += 1; count['where'].append(f'{name} in {st.filename}:{st.lineno} {st.name}')
            return f(self, *a, **k)
        return g
    for n in SYNCS: monkeypatch.setattr(torch.Tensor, n, counting(n, getattr(torch.Tensor, n)))
    r = train(Config(**{**TINY, 'device': 'cpu', 'precision': precision, 'ema': True}, checkpoint_dir=str(tmp_path/'ck')),
              callbacks=[On(), Off()], say=lambda *a, **k: None)
    assert len(r['history']) == 2 and count['steps'] == 6
    from collections import Counter
    assert count['syncs'] <= count['steps'], (count['syncs'], count['steps'], Counter(count['where']).most_common(8))
