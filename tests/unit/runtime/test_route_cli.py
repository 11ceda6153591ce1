"""``moe-router route`` arguments: a bad token count is a usage error naming the flag."""

from __future__ import annotations

import pytest

from router_runtime.__main__ import build_parser


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_a_bad_token_count_is_refused_naming_the_flag(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["route", "--tokens", value])
    assert stopped.value.code == 2
    assert "--tokens must be" in capsys.readouterr().err
