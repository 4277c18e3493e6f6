"""Several ranks, one archive, one cache (issue 23.8): processes started at once as the ranks of one or more jobs
(RANK, WORLD_SIZE, LOCAL_RANK set; no process group: extraction and the cache coordinate through the file system)."""
import json, os, signal, subprocess, sys, time, zipfile
from pathlib import Path
import numpy as np, pytest

PRELUDE = '''
import json, os, socket, sys, time
from pathlib import Path
a = json.loads(sys.argv[1])
def start():
    "Say this process is ready, then wait for the go file: all processes of a test start their work together."
    Path(a['ready'], str(os.getpid())).touch()
    while not Path(a['go']).exists(): time.sleep(0.005)
'''

EXTRACT = PRELUDE + '''
import codseg.archives as L
def counted(*args, unpack=L._unpack):
    "`_unpack`, counted in a file all processes append to."
    with open(a['count'], 'a') as f: f.write('x')
    return unpack(*args)
L._unpack = counted
start()
out, now = L.extract(Path(a['archive']), Path(a['xd']))
def files(): return sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file())
first = files(); time.sleep(0.3)  # still whole a moment later, while the other processes finish
print(json.dumps({'out': str(out), 'now': now, 'files': first, 'later': files()}))
'''

HOLD_LOCK = PRELUDE + '''
from codseg.archives import _exclusive, _target
out = _target(Path(a['archive']), Path(a['xd'])); out.parent.mkdir(parents=True, exist_ok=True)
with _exclusive(out.with_name(f'.{out.name}.lock'), 5, 'holding'):  # an extraction that will be killed midway
    part = out.with_name(f'.{out.name}.{socket.gethostname()}.{os.getpid()}.abcdef.part'); part.mkdir()
    (part/'half-written').write_text('x')
    start(); time.sleep(120)
'''

BUILD = PRELUDE + '''
from codseg.config import Config
from codseg.data import build_data
start()
d = build_data(Config(dataset_path=a['data'], img_size=a['size'], cache_dir=a['cache'], num_workers=0, seed=1),
               (0.5,) * 3, (0.25,) * 3)
sets = [d.train_ds, d.val_ds]
print(json.dumps({'summary': d.summary.splitlines()[-1], 'pairs': sum(len(s.pairs) for s in sets),
                  'entries': [str(e) if e else None for s in sets for e in s.entries]}))
'''

HOLD_CLAIM = PRELUDE + '''
from codseg.config import Config
from codseg.data import build_data
from codseg.cache import _chunks, _claim, _claim_file, _entry_paths
ds = build_data(Config(dataset_path=a['data'], img_size=a['size'], num_workers=0, seed=1), (0.5,) * 3, (0.25,) * 3).train_ds
chunk = _chunks(_entry_paths(ds, a['cache'], 1))[0]; chunk[0][1].parent.mkdir(parents=True, exist_ok=True)
assert _claim(_claim_file(chunk), 120)  # a process that claimed a chunk, then hangs (and is killed)
start(); time.sleep(120)
'''

FILL = PRELUDE + '''
from codseg.config import Config
from codseg.data import build_data
from codseg.cache import fill_cache, use_cache
ds = build_data(Config(dataset_path=a['data'], img_size=a['size'], num_workers=0, seed=1), (0.5,) * 3, (0.25,) * 3).train_ds
start()
made = fill_cache(ds, a['cache'], workers=1, rank=int(os.environ['RANK']), world=int(os.environ['WORLD_SIZE']))
print(json.dumps({'made': made, 'used': use_cache(ds, a['cache'], 1), 'pairs': len(ds.pairs)}))
'''


class Ranks:
    "Processes started together, each in its own process group (killed whole at the end or on a timeout)."
    def __init__(self, tmp: Path): self.tmp, self.procs, self.n = tmp, [], 0

    def start(self, script: str, args: dict, rank=0, world=1, local_rank=None, local_world=None):
        "Start `script` as rank `rank` of `world`; it waits for the go file after saying it is ready."
        ready, go = self.tmp/'ready', self.tmp/'go'
        ready.mkdir(exist_ok=True)
        env = {**os.environ, 'RANK': str(rank), 'WORLD_SIZE': str(world), 'OMP_NUM_THREADS': '1',
               'LOCAL_RANK': str(rank if local_rank is None else local_rank),
               'LOCAL_WORLD_SIZE': str(world if local_world is None else local_world)}
        arg = json.dumps({**args, 'ready': str(ready), 'go': str(go)})
        p = subprocess.Popen([sys.executable, '-c', script, arg], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(p)
        return p

    def ready(self, n: int, timeout=120):
        "Wait (bounded) until `n` processes said they are ready."
        end = time.monotonic() + timeout
        while len(list((self.tmp/'ready').iterdir())) < n:
            if dead := [p for p in self.procs if p.poll() is not None]:
                pytest.fail(f'a process ended before it was ready: {dead[0].stderr.read()[-3000:]}')
            assert time.monotonic() < end, 'processes not ready in time'
            time.sleep(0.05)

    def go(self, procs, timeout=180) -> list[dict]:
        "Release every started process; the JSON line each of `procs` prints (each must succeed)."
        self.ready(len(self.procs))
        (self.tmp/'go').touch()
        end, out = time.monotonic() + timeout, []
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1, end - time.monotonic()))
            assert p.returncode == 0, stderr[-3000:]
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out

    def kill(self, p):
        "Kill `p` and its group at once (SIGKILL), and reap it."
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)

    def close(self):
        for p in self.procs:
            if p.poll() is None: self.kill(p)


@pytest.fixture
def ranks(tmp_path):
    r = Ranks(tmp_path)
    yield r
    r.close()


@pytest.fixture(scope='module')
def archive(tmp_path_factory):
    "A zip of 300 small image/mask pairs in the folders layout (large enough that extractions overlap)."
    import cv2
    d = tmp_path_factory.mktemp('arch')
    z, names = d/'pack.zip', []
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(z, 'w') as zf:
        for i in range(300):
            ok, img = cv2.imencode('.jpg', rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
            ok, msk = cv2.imencode('.png', (rng.random((24, 32)) > 0.5).astype(np.uint8) * 255)
            zf.writestr(f'pack/images/{i:03d}.jpg', img.tobytes()); zf.writestr(f'pack/masks/{i:03d}.png', msk.tobytes())
            names += [f'pack/images/{i:03d}.jpg', f'pack/masks/{i:03d}.png']
    return z, sorted(names + ['.codseg-extracted'])


def test_concurrent_extraction_once(archive, ranks, tmp_path):
    "Four ranks of two jobs sharing --extract-dir: one extraction; every process gets the same whole folder, kept."
    z, files = archive
    xd = tmp_path/'x'
    count = tmp_path/'unpacked'
    procs = [ranks.start(EXTRACT, {'archive': str(z), 'xd': str(xd), 'count': str(count)}, rank=r % 2, world=2)
             for r in range(4)]
    got = ranks.go(procs)
    assert count.read_text() == 'x'  # unpacked once, by one process
    assert len({g['out'] for g in got}) == 1 and sum(g['now'] for g in got) == 1, got
    assert all(g['files'] == files and g['later'] == files for g in got)
    out = Path(got[0]['out'])
    assert sorted(p.name for p in xd.iterdir()) == sorted([out.name, f'.{out.name}.lock'])  # no part left


def test_killed_extraction_frees_its_lock(archive, ranks, tmp_path):
    "A process killed while extracting holds no one up: the lock frees, its part folder is removed, all extract."
    z, files = archive
    xd = tmp_path/'x'
    holder = ranks.start(HOLD_LOCK, {'archive': str(z), 'xd': str(xd)})
    ranks.ready(1)
    waiter = ranks.start(EXTRACT, {'archive': str(z), 'xd': str(xd), 'count': str(tmp_path/'unpacked')}, rank=1,
                         world=2)
    ranks.ready(2)
    (tmp_path/'go').touch()
    time.sleep(1.5)
    assert waiter.poll() is None  # waiting for the lock
    assert any(p.name.endswith('.part') for p in xd.iterdir())
    ranks.kill(holder)
    stdout, stderr = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, stderr[-3000:]
    got = json.loads(stdout.strip().splitlines()[-1])
    assert got['now'] and got['files'] == files
    assert not [p.name for p in xd.iterdir() if p.name.endswith('.part')]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "Two small synthetic datasets (COD10K-v3 layout), different scenes."
    from codseg.synthetic import write_synthetic
    d = tmp_path_factory.mktemp('data')
    return [write_synthetic(d/f'set{k}', 120, 48, k) for k in (1, 2)]


def _check(got: list[dict], folder: Path):
    "Every process attached every entry, each whole; nothing temporary left in `folder`."
    from codseg.cache import read_entry
    for g in got:
        assert None not in g['entries'] and len(g['entries']) == g['pairs'], g['summary']
        assert f"{g['pairs']} of {g['pairs']} pairs" in g['summary']
    assert all(read_entry(e)[0].ndim == 3 for e in got[0]['entries'])
    assert not [p.name for p in folder.rglob('.*')]  # no temporary entry, no claim


def _made(got: list[dict]) -> int:
    return sum(int(g['summary'].split(' made now')[0].rsplit('(', 1)[1]) for g in got)


def test_shared_cache_filled_once_by_four_ranks(data, ranks, tmp_path):
    "Four ranks, one shared --cache-dir: each entry made once, by one of them; every rank uses all of them."
    cache = tmp_path/'cache'
    procs = [ranks.start(BUILD, {'data': str(data[0]), 'size': 40, 'cache': str(cache)}, rank=r, world=4)
             for r in range(4)]
    got = ranks.go(procs)
    _check(got, cache)
    n = got[0]['pairs']
    assert _made(got) == n and len(list(cache.rglob('*.npy'))) == n


def test_node_local_caches_each_filled_whole(data, ranks, tmp_path):
    "Two nodes of two ranks, a --cache-dir on each node's own disk: each node's folder gets every entry, once."
    nodes = [tmp_path/'node0', tmp_path/'node1']
    procs = [ranks.start(BUILD, {'data': str(data[0]), 'size': 40, 'cache': str(nodes[r // 2])}, rank=r, world=4,
                         local_rank=r % 2, local_world=2) for r in range(4)]
    got = ranks.go(procs)
    for k, node in enumerate(nodes):
        mine = got[2 * k:2 * k + 2]
        _check(mine, node)
        assert all(e.startswith(str(node)) for g in mine for e in g['entries'])  # each node reads its own disk
        assert _made(mine) == mine[0]['pairs'] == len(list(node.rglob('*.npy')))


def test_jobs_sharing_a_cache(data, ranks, tmp_path):
    "Three jobs of two ranks at once on one --cache-dir (two on the same data): each entry made once, none lost."
    cache = tmp_path/'cache'
    jobs = [data[0], data[0], data[1]]
    procs = [ranks.start(BUILD, {'data': str(d), 'size': 40, 'cache': str(cache)}, rank=r, world=2)
             for d in jobs for r in range(2)]
    got = ranks.go(procs)
    _check(got, cache)
    n0, n1 = got[0]['pairs'], got[4]['pairs']
    assert _made(got[:4]) == n0 and _made(got[4:]) == n1
    assert len(list(cache.rglob('*.npy'))) == n0 + n1 and set(got[0]['entries']) == set(got[2]['entries'])
    assert all(Path(e).is_file() for g in got for e in g['entries'])  # no job removed another's entries


def test_killed_filler_is_taken_over(data, ranks, tmp_path):
    "A process that claimed part of the cache and was killed holds no one up: its chunk is made by another."
    cache = tmp_path/'cache'
    holder = ranks.start(HOLD_CLAIM, {'data': str(data[0]), 'size': 40, 'cache': str(cache)})
    ranks.ready(1)
    filler = ranks.start(FILL, {'data': str(data[0]), 'size': 40, 'cache': str(cache)}, rank=1, world=2)
    ranks.ready(2)
    (tmp_path/'go').touch()
    time.sleep(2)
    assert filler.poll() is None and list(cache.rglob('.claim-*'))  # waiting for the claimed chunk
    ranks.kill(holder)
    stdout, stderr = filler.communicate(timeout=60)  # well before the claim is stale (STALE, 120 s)
    assert filler.returncode == 0, stderr[-3000:]
    got = json.loads(stdout.strip().splitlines()[-1])
    assert got['made'] == got['used'] == got['pairs'] and not list(cache.rglob('.claim-*'))
