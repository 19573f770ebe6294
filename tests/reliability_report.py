"""The reliability suite's report: what was tried, and what happened, as a Markdown table.

As a pytest plugin (tests/test_reliability.py loads it with `pytest_plugins`), it gives the tests a
`reliability` fixture: `reliability(category, case, script, outcome)` records one row, where
`outcome` is what the test observed (exit code, the reason printed). When the test ends, each of its
rows gets the test's result (pass, known bug = xfail, FAILED). At the end of the session the rows go
to <pytest basetemp>/reliability.json and reliability.md; with RELIABILITY_DOCS=1 in the
environment the table between the markers below in docs/reliability.md is rewritten as well.

    RELIABILITY_DOCS=1 .venv/bin/python -m pytest tests/test_reliability.py   # run and update docs/reliability.md
    .venv/bin/python tests/reliability_report.py [records.json]                  # the page from the last run
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"
PAGE = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
CATEGORIES = ("fault", "bad input", "hostile file")
_rows = []  # every row of this session, in the order recorded


def _status(report):
    if report.passed and not hasattr(report, "wasxfail"):
        return "ok"
    if hasattr(report, "wasxfail"):
        return "known bug (xfail): " + str(report.wasxfail).removeprefix("reason: ")
    return "skipped: " + str(report.longrepr[-1]) if report.skipped else "FAILED"


@pytest.fixture
def reliability(request):
    """Record (category, case, script, outcome) rows for this test; the test's result is added later."""
    def record(category, case, script, outcome):
        assert category in CATEGORIES, category
        _rows.append({"category": category, "case": case, "script": script, "outcome": str(outcome),
                      "test": request.node.nodeid, "result": "FAILED"})
    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call" or (report.when == "setup" and not report.passed):
        for row in _rows:
            if row["test"] == item.nodeid:
                row["result"] = _status(report)


def pytest_sessionfinish(session):
    if not _rows:
        return
    base = session.config._tmp_path_factory.getbasetemp()
    (base / "reliability.json").write_text(json.dumps(_rows, indent=1, ensure_ascii=False) + "\n", "utf-8")
    (base / "reliability.md").write_text(render(_rows), "utf-8")
    if os.environ.get("RELIABILITY_DOCS") == "1":
        opt = session.config.option
        if opt.keyword or opt.markexpr or session.testsfailed:
            print(f"\nRELIABILITY_DOCS=1: {PAGE} left as it was (only a full, passing run rewrites it)")
        else:
            update_page(PAGE, render(_rows))


def render(rows):
    """The Markdown table: faults, then bad inputs, then hostile files, each in the order tried.

    Cases that ended the same way in several scripts share one line that lists the scripts.
    """
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " ")

    counts = {}
    for r in rows:
        counts[r["result"].split(":")[0]] = counts.get(r["result"].split(":")[0], 0) + 1
    merged = {}
    for r in sorted(rows, key=lambda r: CATEGORIES.index(r["category"])):  # stable: order tried kept
        key = (r["category"], r["case"], r["outcome"], r["result"])
        merged.setdefault(key, []).append(r["script"])
    lines = [f"{len(rows)} checks: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + ".", "",
             "| category | case | script(s) | outcome | result |", "|---|---|---|---|---|"]
    lines += [f"| {cat} | {cell(case)} | {cell(', '.join(dict.fromkeys(scripts)))} | {cell(outcome)} | "
              f"{cell(result)} |" for (cat, case, outcome, result), scripts in merged.items()]
    return "\n".join(lines) + "\n"


def update_page(readme, table):
    text = Path(readme).read_text("utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: markers {START} ... {END} not found")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    Path(readme).write_text(f"{head}{START}\n{table}{END}{tail}", "utf-8")


def last_records():
    """reliability.json of the newest pytest run (pytest keeps the last 3 runs under pytest-of-<user>/)."""
    user = os.environ.get("USER") or os.environ.get("USERNAME") or ""
    found = [p for root in (Path(tempfile.gettempdir()) / f"pytest-of-{user}",
                            *Path(tempfile.gettempdir()).glob("pytest-of-*"))
             for p in root.glob("pytest-*/reliability.json")]
    if found:  # the newest run that recorded any (a later run of other tests records none)
        return max(found, key=lambda p: p.stat().st_mtime)
    raise SystemExit("no reliability.json from an earlier run; run pytest tests/test_reliability.py first")


def main(argv):
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    path = Path(argv[0]) if argv else last_records()
    update_page(PAGE, render(json.loads(path.read_text("utf-8"))))
    print(f"{PAGE}: reliability section rewritten from {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
