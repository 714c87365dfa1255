"""`make stress` (book/stress.py): what it runs exists, and it counts failures from pytest's report."""

from __future__ import annotations

import pytest

from book import stress


@pytest.mark.parametrize("suite", sorted(stress.SUITES))
def test_every_stressed_test_exists(suite):
    paths = [a for a in stress.SUITES[suite][0] if a.startswith("tests/")]
    assert paths and all((stress.ROOT / p).is_file() for p in paths), f"{suite}: {paths}"


def test_every_word_of_the_thread_selection_picks_a_test():
    source = "\n".join((stress.ROOT / p).read_text() for p in stress.SUITES["threads and store"][0]
                       if p.startswith("tests/"))
    for word in stress.THREAD_TESTS.split(" or "):
        assert f"def test_{word}" in source or f"_{word}" in source, f"{word!r} selects no test"


def test_failures_and_errors_are_counted_and_named(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_store" name="test_a"/>
      <testcase classname="tests.test_store" name="test_b"><failure message="x"/></testcase>
      <testcase classname="tests.test_store" name="test_c"><error message="y"/></testcase>
      <testcase classname="tests.test_store" name="test_d"><skipped/></testcase>
    </testsuite></testsuites>""")
    assert stress.junit_counts(report) == (1, 2, 1, ["tests.test_store::test_b", "tests.test_store::test_c"])


def test_a_run_count_below_one_is_refused():
    with pytest.raises(SystemExit):
        stress.main(["--thread-runs", "0"])
