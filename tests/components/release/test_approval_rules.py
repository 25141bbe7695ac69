import pytest

from tumorflow.components.release.approval_rules import AUTO, MANUAL, stricter


@pytest.mark.parametrize(
    ("first", "second", "mode"),
    [(AUTO, AUTO, AUTO), (AUTO, MANUAL, MANUAL), (MANUAL, AUTO, MANUAL), (MANUAL, MANUAL, MANUAL)],
)
def test_manual_wins_whichever_side_asks_for_it(first, second, mode):
    assert stricter(first, second) == mode
