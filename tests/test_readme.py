"""The README's test command is exactly what CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    run, test = cmds
    assert "distac reproduce" in run
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == test


def test_method_table_lists_every_method_with_its_defaults_and_memory():
    import distac

    text = (ROOT / "README.md").read_text()
    rows = {ln.split("|")[1].strip(" `"): ln for ln in text.splitlines() if ln.startswith("| `")}
    for name, m in distac.METHODS.items():
        assert name in rows, f"README method table lacks {name}"
        for p in m.params.values():
            assert f"`{p.name}={p.default!r}`" in rows[name], f"{name}: {p.name}={p.default!r} not in the README row"
        assert m.memory.split(": ", 1)[-1] in rows[name], f"{name}: the README row lacks the record's memory text"
