"""The registry of methods the shared tests run (tests/methods.py) knows every shipped method and says, for each
shared check, that it runs there or why not."""

from pathlib import Path

import pytest

from methods import CHECKS, METHODS, cases, networks

CONF = Path(__file__).resolve().parents[1] / "pixsig_distill" / "conf" / "distill"


def test_every_shipped_method_has_an_entry_of_its_own_name():
    shipped = sorted(p.stem for p in CONF.glob("*.yaml"))
    missing = [name for name in shipped if name not in METHODS or METHODS[name].variant]
    assert not missing, (f"conf/distill/{missing[0]}.yaml has no entry in tests/methods.py: add one (it then runs "
                         f"every shared check; `skips` says why one does not apply)")
    assert all(case.distill in shipped for case in METHODS.values())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_entry_runs_or_explains_each_check(name):
    case = METHODS[name]
    assert set(case.runs) | set(case.skips) <= set(CHECKS)
    assert not set(case.runs) & set(case.skips), "a check both run and skipped"
    assert all(isinstance(why, str) and why for why in case.skips.values())
    for check in CHECKS:
        assert (case.options(check) is None) == (check in case.skips or (case.variant and check not in case.runs))


def test_a_new_method_runs_every_shared_check_by_default(monkeypatch):
    from methods import Case

    monkeypatch.setitem(METHODS, "new_method", Case("dmd"))
    assert all("new_method" in cases(check) for check in CHECKS)


def test_network_names_come_from_the_method(compose_train):
    """What the shared checks compare is what the method checkpoints (here the planner's weightless build)."""
    assert networks(compose_train("distill=dmd")) == ["fake_score", "generator", "generator_ema"]
    assert networks(compose_train("distill=lcm_lora")) == ["lora"]
    assert networks(compose_train("distill=dmd", "distill.ema_decay=null")) == ["fake_score", "generator"]
