"""The docs' command lines and the tests that run them stay in step (tests/documented.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.documented import RUN_BY_CI, as_run, commands_in, commands_run_by_tests, documented_commands

pytestmark = pytest.mark.timeout(30)


def test_every_documented_command_is_run_by_a_test() -> None:
    run = commands_run_by_tests()
    missing = sorted({f"{c.path}:{c.line}: {c.text}" for c in documented_commands()
                      if c.text not in run and c.text not in RUN_BY_CI})
    assert missing == [], "documented but run by no test (call documented(TEXT) in one):\n" + "\n".join(missing)


def test_every_command_a_test_runs_is_still_documented() -> None:
    shown = {c.text for c in documented_commands()}
    stale = sorted(f"{where}: {text}" for text, where in commands_run_by_tests().items() if text not in shown)
    assert stale == []


def test_the_reader_finds_commands_as_a_shell_would(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("""
```sh
mlx-fleet up --model a=demo \\
    --replicas a=2          # two of them
# a comment line
curl http://x -d '{"a": 1,
     "b": 2}'
```

```console
$ mlx-fleet status        # see below
name  state
$ echo "a # b" | cat
```

```python
print("not a command")
```
""")
    assert [c.text for c in commands_in(doc, tmp_path)] == [
        "mlx-fleet up --model a=demo --replicas a=2",
        """curl http://x -d '{"a": 1, "b": 2}'""",
        "mlx-fleet status",
        'echo "a # b" | cat',
    ]
    assert [c.line for c in commands_in(doc, tmp_path)] == [3, 6, 11, 13]


def test_placeholders_are_replaced_as_whole_words() -> None:
    assert as_run("mlx-fleet worker --connect tcp://BROKER_HOST:5556") == "mlx-fleet worker --connect tcp://127.0.0.1:5556"
    assert as_run("BROKER_HOSTS stays") == "BROKER_HOSTS stays"
