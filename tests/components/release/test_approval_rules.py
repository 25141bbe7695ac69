import pytest

from tumorflow.components.release.approval_rules import AUTO, MANUAL, stricter


@pytest.mark.parametrize(
    ("first", "second", "mode"),
    [(AUTO, AUTO, AUTO), (AUTO, MANUAL, MANUAL), (MANUAL, AUTO, MANUAL), (MANUAL, MANUAL, MANUAL)],
)
def test_manual_wins_whichever_side_asks_for_it(first, second, mode):
    assert stricter(first, second) == mode


def test_a_tag_two_writers_create_at_once_is_set_again_other_errors_are_raised():
    """An MLflow server on SQLite answers the second of two simultaneous creations of one tag
    with a unique-constraint error: that write is retried (it then updates); any other error
    is the caller's."""
    from tumorflow.components.release.registry import set_version_tags

    class Client:
        def __init__(self, failures: list[Exception]):
            self.failures, self.tags = failures, {}

        def set_model_version_tag(self, name, version, key, value):
            if self.failures:
                raise self.failures.pop(0)
            self.tags[key] = value

    race = Exception("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: tags")
    client = Client([race, race])
    set_version_tags(client, "m", "1", {"approval.by": "alice", "approval.status": "approved"})
    assert list(client.tags) == ["approval.by", "approval.status"]
    with pytest.raises(Exception, match="permission denied"):
        set_version_tags(Client([Exception("permission denied")]), "m", "1", {"a": "b"})
    with pytest.raises(Exception, match="UNIQUE"):
        set_version_tags(Client([race] * 4), "m", "1", {"a": "b"})
