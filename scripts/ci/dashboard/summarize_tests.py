#!/usr/bin/env python3
"""What a dashboard test step really ran, read from the Test.xml ctest_test wrote.

Prints one line and exits 1 when the run collected no test at all or fewer than
--min-live-cells matrix cells ran live (labelled `cell`, not a `golden` replay, and not Not Run:
their capture really ran transformers). Exit 2: no readable Test.xml.
"""
import argparse
import sys
import xml.etree.ElementTree as ET


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("test_xml")
    ap.add_argument("--min-live-cells", type=int, default=1)
    a = ap.parse_args()
    try:
        root = ET.parse(a.test_xml).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"no readable Test.xml at {a.test_xml}: {e}")
        return 2
    status = {"passed": 0, "failed": 0, "notrun": 0}
    cells = {"total": 0, "live": 0, "golden": 0, "notrun": 0}
    for t in root.iter("Test"):
        s = t.get("Status")
        if s is None:  # the <TestList> entries
            continue
        status[s] = status.get(s, 0) + 1
        labels = {l.text for l in t.iter("Label")}
        if "cell" not in labels:
            continue
        cells["total"] += 1
        if s == "notrun":
            cells["notrun"] += 1
        elif "golden" in labels:
            cells["golden"] += 1
        else:
            cells["live"] += 1
    total = sum(status.values())
    line = (f"collected {total} tests: {status['passed']} passed, {status['failed']} failed, "
            f"{status['notrun']} not run; matrix cells: {cells['total']} collected, {cells['live']} live, "
            f"{cells['golden']} golden replays, {cells['notrun']} not run")
    if total == 0:
        print(f"{line} — FAIL: the run collected no tests")
        return 1
    if cells["live"] < a.min_live_cells:
        print(f"{line} — FAIL: {cells['live']} live cells, at least {a.min_live_cells} required "
              f"(OPENSCI_MIN_LIVE_CELLS)")
        return 1
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
