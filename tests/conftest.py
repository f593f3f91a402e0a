"""Tests run offline: a hub load fails at once instead of retrying for ~20 s."""
import os

import pytest

from saeshare.core.progress import LOG_PREFIX

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def error_line(capsys):
    """error_line(main, argv): the CLI must exit with code exactly 2, print exactly one line on stderr,
    `error: ...`, and no traceback (docs/design.md#bad-input); progress bars, log lines and warnings may come
    before it.
    Returns that line."""

    def run(main, argv) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, err
        assert "Traceback" not in err
        lines = [line for line in err.replace("\r", "\n").strip().splitlines()
                 if "%|" not in line and not line.startswith((LOG_PREFIX, "warning: "))]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    return run
