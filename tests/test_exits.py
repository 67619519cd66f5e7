"""Exit classification: which ways a replica ends are retried."""

from __future__ import annotations

import pytest

from sgdjob.contract import EXIT_ERROR, EXIT_MEANINGS, EXIT_PEER, EXIT_SPEC
from sgdjob.exits import is_retryable


@pytest.mark.parametrize(
    ("code", "reason", "retryable"),
    [
        (0, "", False),
        (1, "", False),
        (127, "", False),
        (2, "", False),
        (3, "", True),
        (128, "", True),
        (137, "", True),
        (1, "OOMKilled", True),
        (None, "", True),
        (2, "Evicted", True),
        (-9, "", True),
    ],
)
def test_exit_classification(code: int | None, reason: str, retryable: bool) -> None:
    assert is_retryable(code, reason) is retryable


def test_every_exit_code_the_trainer_documents_is_classified_as_documented() -> None:
    assert set(EXIT_MEANINGS) == {0, EXIT_ERROR, EXIT_SPEC, EXIT_PEER}
    assert [c for c in EXIT_MEANINGS if c and is_retryable(c, "")] == [EXIT_PEER]
