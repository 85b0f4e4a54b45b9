"""The results docs cannot drift from their own tables: every speed-up ratio `a / b = r` is
recomputed, every claim about a table is written as a check comment beside its sentence and
recomputed, and a sentence that makes such a claim ("below X after N", "ahead at", a quoted
run of values) without a check fails. Where a table names the metric log it came from
(`<!-- table: ID log=PATH -->`) and that log is on this machine, its values are compared too.

Check comments (Markdown comments, invisible on the page):
    <!-- table: ID [key=N] [log=runs/.../summary.json] -->   on the line before a table (rows
                                                      keyed by the first N cells, "a / b / c")
    <!-- check: "COL" < 100 at 200,505 in ID -->         (also >) the cells at those rows
    <!-- check: "A" < "B" exactly at 100,200 in ID -->   A < B at those rows and at no other
    <!-- check: "COL" sequence 95.0,112.0 from 200 in ID -->   the column from that row on
    <!-- check: row "R1" < row "R2" at "C1","C2" in ID -->  two rows compared column by column
    <!-- check: 0.999**3000 ~ 0.05 -->                    arithmetic, within 25%
    <!-- check: no table: REASON -->                      a sentence that reads like a claim on a
                                                          table but is not one (an estimate)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "RESULTS.md", ROOT / "docs" / "methods" / "analytic-precond.md",
        ROOT / "docs" / "methods" / "ctm.md", ROOT / "docs" / "demo.md"]

RATIO = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?) / (\d+(?:\.\d+)?) = \**(\d+\.\d+)\**")
CHECK = re.compile(r"<!-- check: (.*?) -->")
TABLE = re.compile(r"<!-- table: ([\w.-]+)(?: key=(\d+))?(?: log=(\S+))? -->")
CLAIMS = re.compile(r"below \d[\d.]* after \d+|\bahead (?:only )?at\b|\d+(?:\.\d+)? -> \d+(?:\.\d+)? -> \d", re.I)


def _cells(line: str) -> list[str]:
    return [c.strip().strip("*") for c in line.strip().strip("|").split("|")]


def tables(text: str) -> dict:
    """ID -> {"columns": [...], "rows": {row key: [cells]}, "log": path or None}."""
    out = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = TABLE.fullmatch(line.strip())
        if not m:
            continue
        head = _cells(lines[i + 1])
        nkey = int(m.group(2) or 1)
        rows = {}
        for row in lines[i + 3:]:
            if not row.startswith("|"):
                break
            c = _cells(row)
            rows[" / ".join(c[:nkey])] = c
        out[m.group(1)] = {"columns": head, "rows": rows, "log": m.group(3)}
    return out


def _num(cell: str) -> float:
    """A cell's value ("0.055 ± 0.007": the mean)."""
    return float(cell.partition("±")[0].strip().replace("−", "-"))


def _column(table: dict, name: str) -> int:
    assert name in table["columns"], f"no column {name!r} in {table['columns']}"
    return table["columns"].index(name)


def _rows(spec: str) -> list[str]:
    return [r.strip() for r in spec.split(",")]


def run_check(claim: str, tabs: dict) -> None:
    m = re.fullmatch(r'"([^"]+)" ([<>]) ([\d.]+) at ([\d,]+) in ([\w.-]+)', claim)
    if m:
        col, op, x, rows, tid = m.groups()
        t = tabs[tid]
        k = _column(t, col)
        for r in _rows(rows):
            v = _num(t["rows"][r][k])
            assert (v < float(x)) if op == "<" else (v > float(x)), f"{col} at {r} is {v}: not {op} {x}"
        return
    m = re.fullmatch(r'"([^"]+)" < "([^"]+)" exactly at ([\d,]+) in ([\w.-]+)', claim)
    if m:
        a, b, rows, tid = m.groups()
        t = tabs[tid]
        ka, kb = _column(t, a), _column(t, b)
        ahead = [r for r, c in t["rows"].items() if _num(c[ka]) < _num(c[kb])]
        assert ahead == _rows(rows), f"{a} is ahead of {b} at {ahead}, the text says {rows}"
        return
    m = re.fullmatch(r'"([^"]+)" sequence ([\d.,]+) from (\d+) in ([\w.-]+)', claim)
    if m:
        col, seq, start, tid = m.groups()
        t = tabs[tid]
        k = _column(t, col)
        keys = list(t["rows"])
        got = [_num(t["rows"][r][k]) for r in keys[keys.index(start):]]
        assert got == [float(v) for v in seq.split(",")], f"{col} from {start} runs {got}, the text says {seq}"
        return
    m = re.fullmatch(r'row "([^"]+)" < row "([^"]+)" at ((?:"[^"]+",?)+) in ([\w.-]+)', claim)
    if m:
        ra, rb, cols, tid = m.groups()
        t = tabs[tid]
        for col in re.findall(r'"([^"]+)"', cols):
            k = _column(t, col)
            va, vb = _num(t["rows"][ra][k]), _num(t["rows"][rb][k])
            assert va < vb, f"{col}: {ra} {va} is not below {rb} {vb}"
        return
    m = re.fullmatch(r"([\d.]+)\*\*(\d+) ~ ([\d.e-]+)", claim)
    if m:
        v = float(m.group(1)) ** int(m.group(2))
        want = float(m.group(3))
        assert abs(v - want) <= 0.25 * want, f"{claim}: it is {v:.3g}"
        return
    if re.fullmatch(r"no table: .{10,}", claim):
        return
    raise AssertionError(f"unreadable check: {claim!r}")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_speedup_ratios_are_their_quotients(doc):
    """`a / b = r`: r lies within the rounding of a and b (each printed to its last digit)."""
    text = doc.read_text()
    found = 0
    for m in RATIO.finditer(text):
        a, b, r = (float(g) for g in m.groups())
        half_a = 0.5 * 10 ** -len(m.group(1).partition(".")[2])
        half_b = 0.5 * 10 ** -len(m.group(2).partition(".")[2])
        lo, hi = (a - half_a) / (b + half_b), (a + half_a) / max(b - half_b, 1e-9)
        assert lo - 0.005 <= r <= hi + 0.005, f"{doc.name}: {m.group(0)} (the quotient is {a / b:.3f})"
        found += 1
    if doc.name == "RESULTS.md":
        assert found >= 20   # the parser still finds the speed-up tables


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_claim_about_a_table_is_checked_and_holds(doc):
    text = doc.read_text()
    tabs = tables((ROOT / "docs" / "RESULTS.md").read_text())
    tabs.update(tables(text))
    for m in CHECK.finditer(text):
        run_check(m.group(1), tabs)
    for para in re.split(r"\n\s*\n", text):
        prose = CHECK.sub("", para)
        hit = CLAIMS.search(prose)
        if hit and not CHECK.search(para):
            raise AssertionError(f"{doc.name}: a claim with no check beside it: ...{prose[max(0, hit.start() - 80):hit.end() + 40]}...")


def test_tables_agree_with_the_logs_they_cite():
    """Where the cited summary.json of scripts/compare_precond.py is on this machine, the table's
    curve columns ("N-step ARM") are its mean curves to the printed digits."""
    tabs = tables((ROOT / "docs" / "RESULTS.md").read_text())
    assert "fmnist-cpu-ctm" in tabs and "gmm-edm-fixed" in tabs
    for tid, t in tabs.items():
        if not t["log"] or not (ROOT / t["log"]).is_file():
            continue
        log = json.loads((ROOT / t["log"]).read_text())
        its = [str(i) for i in log["iters"]]
        for k, col in enumerate(t["columns"]):
            m = re.fullmatch(r"(\d)-step (\S+)", col)
            if not m or m.group(2) not in log.get(f"curve_{m.group(1)}", {}):
                continue
            curve = log[f"curve_{m.group(1)}"][m.group(2)]
            spread = log.get(f"std_{m.group(1)}", {}).get(m.group(2))
            for r, cells in t["rows"].items():
                mean, _, std = (c.strip() for c in cells[k].partition("±"))
                digits = len(mean.partition(".")[2])
                assert f"{curve[its.index(r)]:.{digits}f}" == mean, f"{tid} {col} at {r}"
                if std and spread is not None:
                    assert f"{spread[its.index(r)]:.{len(std.partition('.')[2])}f}" == std, f"{tid} {col} std at {r}"


def test_the_checker_catches_a_wrong_claim():
    tabs = tables("<!-- table: t -->\n| iters | a | b |\n|---|---|---|\n| 100 | 1.0 | 2.0 |\n| 200 | 3.0 | 2.5 |\n")
    run_check('"a" < "b" exactly at 100 in t', tabs)
    run_check('row "100" < row "200" at "a","b" in t', tabs)
    with pytest.raises(AssertionError):
        run_check('row "200" < row "100" at "b" in t', tabs)
    run_check('"a" sequence 1.0,3.0 from 100 in t', tabs)
    for wrong in ('"a" < 2 at 100,200 in t', '"a" < "b" exactly at 100,200 in t', '"a" sequence 1.0,2.0 from 100 in t',
                  "0.999**9000 ~ 0.05"):
        with pytest.raises(AssertionError):
            run_check(wrong, tabs)
    assert not RATIO.fullmatch("117 / 50 = **2.32**") is None
