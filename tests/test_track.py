"Experiment tracking end to end: TensorBoard and W&B logs across a resume, validation loss, panels, --monitor, weights from Kaggle Models."
import csv, json, math, struct
from pathlib import Path
import numpy as np
import pytest
import timm
import torch
from codseg.config import Config
from codseg.train import train, train_cli

TINY = dict(dataset_path='synthetic', synthetic_n=24, synthetic_size=48, img_size=48, val_fraction=0.25,
            backbone='edgenext_xx_small', pretrained=False, num_experts=3, epochs=3, stage1_epochs=1, batch_size=4,
            accumulation_steps=2, lr=2e-3, num_workers=0, scheduler='cosine')
QUIET = dict(say=lambda *a, **k: None)

def run(ck, **kw):
    "Train TINY (with `kw`) into folder `ck`; the summary and last.pth."
    r = train(Config(**{**TINY, **kw}, checkpoint_dir=str(ck)), **QUIET)
    return r, torch.load(Path(ck)/'last.pth', weights_only=True)

def steps_per_epoch(ck):
    "Optimizer steps per epoch of the run in `ck` (from its last.pth: global step / epochs done)."
    c = torch.load(Path(ck)/'last.pth', weights_only=True)
    return c['global_step'] // c['epoch']

def new_bests(history, key='iou', pick=max):
    "The epochs that improved on every earlier epoch's `key`."
    out, best = [], None
    for r in history:
        if best is None or (pick(r[key], best) == r[key] and r[key] != best): out.append(r['epoch']); best = r[key]
    return out

def tb_scalars(folder):
    "{tag: [(step, value)]} of the TensorBoard event files in `folder`, as TensorBoard shows them (purges applied)."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(folder), size_guidance={'scalars': 0, 'images': 0, 'tensors': 0}); ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}, ea

def test_tensorboard_history_and_panels_across_a_resume(tmp_path):
    ck = tmp_path/'ck'
    kw = dict(epochs=5, logger='csv,tensorboard', panel_every=0)
    r1, c1 = run(ck, stop_after=2, **kw)
    assert r1['stopped'] == 'session limit' and c1['epoch'] == 2
    r2, c2 = run(ck, resume_from='auto', **kw)
    n, total = steps_per_epoch(ck), c2['global_step']
    assert total == 5 * n
    scalars, ea = tb_scalars(ck/'tensorboard')
    # per optimizer step: the training loss and both groups' LR, steps continuing across the resume
    for tag in ('train/loss', 'lr/decoder', 'lr/backbone'):
        assert [s for s, _ in scalars[tag]] == list(range(total)), tag
    assert all(math.isfinite(v) for _, v in scalars['train/loss'])
    lrs = dict(scalars['lr/backbone'])
    assert lrs[0] == 0.0 and lrs[total - 1] > 0  # frozen in Stage 1, x backbone_lr_mult in Stage 2
    # per epoch, at the epoch's last step: validation loss, IoU, Dice, as history.csv has them
    rows = list(csv.DictReader(open(ck/'history.csv')))
    assert [int(r['epoch']) for r in rows] == [1, 2, 3, 4, 5] and 'val_loss' in rows[0]
    for tag, key in (('val/loss', 'val_loss'), ('val/iou', 'iou'), ('val/dice', 'dice'), ('train/epoch_loss', 'loss')):
        assert [s for s, _ in scalars[tag]] == [(e + 1) * n - 1 for e in range(5)], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([float(r[key]) for r in rows], rel=1e-6), tag
    assert len(list((ck/'tensorboard').glob('events.out.tfevents.*'))) == 2  # one folder, one file per session
    assert {'lr_plan', 'predictions'} <= set(ea.Tags()['images'])
    # the validation loss in history.csv and last.pth, and on the curves
    assert all(math.isfinite(float(r['val_loss'])) and float(r['val_loss']) > 0 for r in rows)
    assert all('val_loss' in h for h in c2['history']) and (ck/'curves.png').is_file()
    # panels: the first epoch of each session (1, 3), where a session limit ended one (2), the last (5), each new best
    want = {1, 2, 3, 5} | set(new_bests(c2['history']))
    assert sorted(int(p.stem[-3:]) for p in (ck/'predictions').glob('epoch_*.png')) == sorted(want)
    assert len(ea.Images('predictions')) == len(want)

def test_tensorboard_hides_what_a_killed_session_logged_after_its_checkpoint(tmp_path):
    "A session killed after logging past its last checkpoint: the resumed run's steps replace those events."
    ck = tmp_path/'ck'
    kw = dict(epochs=2, logger='tensorboard')
    run(ck, stop_after=1, **kw)
    saved = (ck/'last.pth').read_bytes()
    _, c2 = run(ck, resume_from='auto', **kw)  # epoch 2 logged, then "killed": its checkpoint is lost
    (ck/'last.pth').write_bytes(saved)
    _, c3 = run(ck, resume_from='auto', **kw)
    scalars, _ = tb_scalars(ck/'tensorboard')
    assert [s for s, _ in scalars['train/loss']] == list(range(2 * steps_per_epoch(ck)))
    assert [v for _, v in scalars['val/loss']] == pytest.approx([h['val_loss'] for h in c3['history']])

def wandb_records(path):
    "The protobuf records of a W&B offline run file (LevelDB log format: 32 KiB blocks of crc, length, type, data)."
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf, out = Path(path).read_bytes(), 7, b'', []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7: pos += 32768 - pos % 32768; continue
        _, n, kind = struct.unpack('<IHB', data[pos:pos + 7]); pos += 7
        buf += data[pos:pos + n]; pos += n
        if kind in (1, 4): r = pb.Record(); r.ParseFromString(buf); out.append(r); buf = b''  # FULL or LAST
    return out

def wandb_history(folder):
    "{run id: [history rows]} of the offline W&B runs under `folder`, in the order they were written."
    runs = {}
    for f in sorted(Path(folder).glob('wandb/offline-run-*/run-*.wandb')):
        recs = wandb_records(f)
        rid = next(r.run.run_id for r in recs if r.WhichOneof('record_type') == 'run')
        runs.setdefault(rid, []).extend({(i.key or '/'.join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                                        for r in recs if r.WhichOneof('record_type') == 'history')
    return runs

def test_wandb_offline_run_holds_the_history_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip('wandb', reason='the wandb extra: pip install codseg[wandb]')
    monkeypatch.setenv('WANDB_MODE', 'offline'); monkeypatch.setenv('WANDB_DIR', str(tmp_path/'wb'))
    monkeypatch.setenv('WANDB_SILENT', 'true'); monkeypatch.delenv('WANDB_API_KEY', raising=False)
    (tmp_path/'wb').mkdir()
    ck = tmp_path/'ck'
    _, c1 = run(ck, logger='wandb', stop_after=1)
    _, c2 = run(ck, logger='wandb', resume_from='auto')
    rid = c1['track']['wandb_id']
    assert rid and c2['track']['wandb_id'] == rid
    runs = wandb_history(tmp_path/'wb')
    assert list(runs) == [rid]  # both sessions in one run
    rows, total = runs[rid], c2['global_step']
    assert [r['_step'] for r in rows if 'train/loss' in r] == list(range(total))
    assert all('lr/decoder' in r and 'lr/backbone' in r for r in rows if 'train/loss' in r)
    epochs = [r for r in rows if 'val/loss' in r]
    assert [r['epoch'] for r in epochs] == [1, 2, 3]
    assert [r['val/loss'] for r in epochs] == pytest.approx([h['val_loss'] for h in c2['history']])
    assert [r['val/iou'] for r in epochs] == pytest.approx([h['iou'] for h in c2['history']])
    assert sum(r.get('predictions/_type') == 'image-file' for r in rows) >= 2  # the panels of epochs 1 and 3 at least

def test_monitor_smeasure_picks_the_best_smeasure(tmp_path):
    from codseg.data import build_data
    from codseg.metrics import SODMeter, to_uint8_map
    from codseg.train import model_from_checkpoint
    ck = tmp_path/'ck'
    r, last = run(ck, monitor='smeasure', epochs=4)
    h = last['history']
    assert all(k in row for row in h for k in ('sm', 'mae', 'wfm', 'val_loss'))
    best = max(h, key=lambda row: row['sm'])
    assert last['monitor'] == 'smeasure' and last['best_epoch'] == best['epoch'] and last['best_score'] == best['sm']
    b = torch.load(ck/'best_model.pth', weights_only=True)
    assert b['epoch'] == best['epoch'] and b['best_epoch'] == best['epoch']
    if max(h, key=lambda row: row['iou'])['epoch'] != best['epoch']: print('here IoU would have picked another epoch')
    # the S-measure is PySODMetrics' on the validation set: recompute it from best_model.pth
    model, cfg = model_from_checkpoint(ck/'best_model.pth')
    val, meter = build_data(cfg, model.mean, model.std).val_ds, SODMeter()
    with torch.inference_mode():
        for i in range(len(val)):
            b = val[i]
            logits = model(b['image'][None])['logits'][0, 0]
            meter.update(to_uint8_map(logits, logits.shape, from_logits=True), (b['mask'][0].numpy() * 255).astype(np.uint8))
    got = meter.compute()
    assert got['Sm'] == pytest.approx(best['sm'], abs=1e-4) and got['MAE'] == pytest.approx(best['mae'], abs=1e-4)

def test_monitor_mae_is_lower_better_and_a_changed_monitor_keeps_the_best(tmp_path):
    ck = tmp_path/'ck'
    run(ck, stop_after=1)
    _, last = run(ck, resume_from='auto', monitor='mae')
    h, be = last['history'], last['best_epoch']
    assert 'mae' not in h[0] and all('mae' in row for row in h[1:])
    # the IoU-chosen best of the first session has no MAE: the first epoch with one beats it, then the lowest MAE wins
    assert be == min(h[1:], key=lambda row: row['mae'])['epoch']
    assert torch.load(ck/'best_model.pth', weights_only=True)['epoch'] == be

def test_bad_logger_is_refused(tmp_path, capsys):
    from codseg.cli import main
    argv = ['train', '--dataset-path', 'synthetic', '--checkpoint-dir', str(tmp_path/'ck'), '--logger', 'csv,mlflow']
    assert main(argv) == 2 and '--logger csv,mlflow must be a comma list of csv, tensorboard, wandb' in capsys.readouterr().err
    with pytest.raises(ValueError, match='unknown logger mlflow'):  # the same from Python
        run(tmp_path/'ck2', logger='csv,mlflow')
    assert not (tmp_path/'ck2'/'last.pth').exists()

def test_pretrained_path_auto_finds_kaggle_model_weights(tmp_path, monkeypatch, capsys):
    import codseg.model as M
    models = tmp_path/'input'/'models'/'timm'/'edgenext'/'pytorch'
    ref = timm.create_model('edgenext_xx_small')
    for v in ('1', '2'):
        (models/'edgenext_xx_small.in1k'/v).mkdir(parents=True)
        torch.save(ref.state_dict(), models/'edgenext_xx_small.in1k'/v/'pytorch_model.bin')
    (models/'edgenext_small'/'1').mkdir(parents=True)  # another model's weights
    torch.save(timm.create_model('edgenext_small').state_dict(), models/'edgenext_small'/'1'/'pytorch_model.bin')
    monkeypatch.setenv('CODSEG_KAGGLE_INPUT', str(tmp_path/'input'))
    model = M.build_model(Config(backbone='edgenext_xx_small', num_experts=3, pretrained_path='auto'))
    said = capsys.readouterr().out
    assert "weights of 'edgenext_xx_small' from" in said and '/2/pytorch_model.bin' in said
    body = {k: v for k, v in ref.state_dict().items() if not k.startswith('head.')}
    got = model.backbone.state_dict()
    assert len(got) == len(body) and all(torch.equal(a, b) for a, b in zip(got.values(), body.values()))
    # through the trainer; and a tree without the backbone says what it looked for
    r = train(Config(**{**TINY, 'pretrained': True, 'pretrained_path': 'auto', 'epochs': 1, 'stage1_epochs': 1},
                     checkpoint_dir=str(tmp_path/'ck')), **QUIET)
    assert len(r['history']) == 1 and "weights of 'edgenext_xx_small'" in capsys.readouterr().out
    monkeypatch.setenv('CODSEG_KAGGLE_INPUT', str(tmp_path/'empty'))
    with pytest.raises(FileNotFoundError, match='looked for'):
        M.build_model(Config(backbone='edgenext_xx_small', num_experts=3, pretrained_path='auto'))

def test_panel_shows_the_same_validation_items_every_epoch(tmp_path):
    "The prediction panel's images are evenly spaced plain validation items, the same ones in every epoch."
    from codseg.track import PanelCB, panel_indices
    seen = []
    class Spy:  # a callback: the panel's inputs at the end of each epoch
        order = 99
        def after_epoch(self, learn):
            p = next(cb for cb in learn.cbs if isinstance(cb, PanelCB))
            val = learn.valid_dl.dataset
            want = [val[i] for i in panel_indices(len(val))]
            assert p.names == [b['name'] for b in want]
            assert torch.equal(p.x, torch.stack([b['image'] for b in want]))
            seen.append((p.x.clone(), p.images.copy()))
    train(Config(**{**TINY, 'epochs': 2}, checkpoint_dir=str(tmp_path/'ck')), callbacks=[Spy()], **QUIET)
    assert len(seen) == 2 and torch.equal(seen[0][0], seen[1][0]) and np.array_equal(seen[0][1], seen[1][1])

def test_pretrained_path_auto_skips_a_longer_timm_name(tmp_path):
    "--pretrained-path auto for edgenext_small never takes edgenext_small_rw's weights (another timm model), tags aside."
    from codseg.model import find_kaggle_weights
    root = tmp_path/'input'
    def put(rel):
        (root/rel).parent.mkdir(parents=True, exist_ok=True); (root/rel).write_bytes(b'')
        return root/rel
    put('models/timm/edgenext/pytorch/edgenext_small_rw/1/model.safetensors')
    with pytest.raises(FileNotFoundError, match='looked for'): find_kaggle_weights('edgenext_small', root, say=print)
    ours = put('models/timm/edgenext/pytorch/edgenext_small.usi_in1k/1/model.safetensors')
    assert find_kaggle_weights('edgenext_small', root, say=print) == ours
    assert find_kaggle_weights('edgenext_small_rw', root, say=print).parts[-3] == 'edgenext_small_rw'
