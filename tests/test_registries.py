"""Each registry owns its names: the names the config declares (argparse's choices, `--help`, the CLI's messages)
equal the registry's keys, so a half-done addition (an entry without its name, or a name without its entry) fails."""
import argparse, re, typing
from pathlib import Path
import pytest
from codseg.config import LOGGERS, Config, Loss, Monitor, Scheduler, add_args, field_help, parse_loggers
from codseg.errors import LOGGER_PACKAGES
from codseg.losses import LOSSES, CODLoss
from codseg.schedule import CURVES, PlanError, check_plan
from codseg.track import LOGGER_TYPES, MONITORS, Logger, make_loggers, monitor_key

REGISTRIES = {  # flag: (the registry, the names the config declares for it)
    '--scheduler': (CURVES, typing.get_args(Scheduler)),
    '--loss': (LOSSES, typing.get_args(Loss)),
    '--monitor': (MONITORS, typing.get_args(Monitor)),
    '--logger': (LOGGER_TYPES, LOGGERS),
}


def mismatch(registry, names) -> str:
    "What keeps `registry`'s keys from being `names` ('' when they are the same)."
    extra, missing = sorted(set(registry) - set(names)), sorted(set(names) - set(registry))
    return '; '.join(s for s in (extra and f"registered, not in the config (argparse refuses it): {', '.join(extra)}",
                                 missing and f"in the config, not registered: {', '.join(missing)}") if s)


@pytest.mark.parametrize('flag', REGISTRIES)
def test_registry_equals_the_config_names(flag):
    registry, names = REGISTRIES[flag]
    assert mismatch(registry, names) == '', f'{flag}: {mismatch(registry, names)}'


def test_a_half_done_addition_is_a_mismatch():
    "A curve in `CURVES` only, or a loss name in `config.Loss` only, is reported, with the side it is missing from."
    some = next(iter(CURVES.values()))
    assert mismatch({**CURVES, 'linear': some}, typing.get_args(Scheduler)) == \
        'registered, not in the config (argparse refuses it): linear'
    assert mismatch(LOSSES, typing.get_args(Loss) + ('l1',)) == 'in the config, not registered: l1'


def test_argparse_offers_the_registries():
    "The choices argparse checks and `--help` prints are the registries' names."
    regs = {'scheduler': CURVES, 'stage1_scheduler': CURVES, 'loss': LOSSES, 'monitor': MONITORS}
    p = add_args(argparse.ArgumentParser())
    got = {a.dest: set(a.choices) for a in p._actions if a.dest in regs}
    assert got == {k: set(r) for k, r in regs.items()}


def test_help_names_every_logger_and_loss():
    "`--logger` is a comma list (argparse lists no choices for it): its help names every logger; `--loss`'s, every loss."
    h = field_help()
    assert all(re.search(rf'\b{n}\b', h['logger']) for n in LOGGER_TYPES), h['logger']
    assert all(re.search(rf'\b{n}\b', h['loss']) for n in LOSSES), h['loss']


def test_refusals_list_the_registry():
    "Each refusal of an unknown name lists the registry's names, in its order."
    for fn, names in ((lambda: monitor_key('dice'), MONITORS), (lambda: CODLoss('focal', 0.5, 0.01), LOSSES),
                      (lambda: check_plan(Config(scheduler='linear')), CURVES),
                      (lambda: parse_loggers('csv,mlflow'), LOGGERS)):
        with pytest.raises(ValueError, match=re.escape(', '.join(names))): fn()
    with pytest.raises(PlanError, match=re.escape(f"--stage1-scheduler linear is not a curve: give one of {', '.join(CURVES)}")):
        check_plan(Config(stage1_scheduler='linear'))


def test_cli_logger_refusal_lists_the_loggers(tmp_path, capsys):
    from codseg.cli import main
    argv = ['train', '--dataset-path', 'synthetic', '--checkpoint-dir', str(tmp_path/'ck'), '--logger', 'csv,mlflow']
    assert main(argv) == 2
    assert f"--logger csv,mlflow must be a comma list of {', '.join(LOGGERS)}" in capsys.readouterr().err


@pytest.mark.parametrize('name', [n for n, c in LOGGER_TYPES.items() if c is not None])
def test_every_logger_type_is_a_logger(name):
    "Each class in the table has the six methods of `Logger`, and `open` and `package` for `make_loggers` and the CLI."
    cls = LOGGER_TYPES[name]
    assert issubclass(cls, Logger) and callable(cls.open) and hasattr(cls, 'package'), cls


def test_the_protocol_asks_for_all_six():
    class NoState:
        def scalars(self, d, step): pass
        def image(self, tag, img, step): pass
        def text(self, tag, s, step): pass
        def flush(self): pass
        def close(self): pass
    assert not isinstance(NoState(), Logger) and not issubclass(NoState, Logger)
    NoState.state = lambda self: {}
    assert isinstance(NoState(), Logger)


def test_logger_packages_are_the_tables():
    "The CLI refuses `--logger NAME` without its package before torch is imported (`errors.LOGGER_PACKAGES`, looked "
    "up by the logger's name): exactly the loggers whose class needs one."
    assert {n: c.package for n, c in LOGGER_TYPES.items() if c and c.package} == {n: n for n in LOGGER_PACKAGES}


def test_make_loggers_opens_what_the_table_holds(monkeypatch, tmp_path):
    "A class registered in the table is opened by `make_loggers` (no name is special-cased), with the run's arguments."
    opened = []
    class Spy:
        package = None
        @classmethod
        def open(cls, out_dir, config, saved, resumed_at=None, say=print):
            opened.append((Path(out_dir), config, saved, resumed_at))
            return cls()
    monkeypatch.setitem(LOGGER_TYPES, 'spy', Spy)
    made = make_loggers(('csv', 'spy'), tmp_path, {'a': 1}, resume={'track': {'k': 2}}, step=5)
    assert [type(m) for m in made] == [Spy] and opened == [(tmp_path, {'a': 1}, {'k': 2}, 5)]
    make_loggers(('spy',), tmp_path, {}, step=5)  # a fresh run: no step to resume at
    assert opened[-1] == (tmp_path, {}, {}, None)
    assert make_loggers(('csv',), tmp_path, {}) == []  # csv: history.csv and curves.png, nothing to open
