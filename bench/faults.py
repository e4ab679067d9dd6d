"""Faults in simulation: a 2-hour regional partition plus 20% permanent deaths (figure 5).

Runs ``scenarios/partition-and-deaths.toml`` and compares the faulty arm with the
fault-free one: training must continue, no update may be applied twice, and the final
accuracy should stay within 2 points.

    .venv/bin/python bench/faults.py
"""

from __future__ import annotations

from _common import run


def main() -> None:
    report = run("partition-and-deaths.toml")
    clean = report.arm("fault-free")
    faulty = report.arm("partition-and-deaths")
    print(f"fault-free: final accuracy {clean.final_accuracy:.3f}, versions {clean.versions}")
    print(
        f"faults: final accuracy {faulty.final_accuracy:.3f}, versions {faulty.versions}, "
        f"deaths {faulty.extra.get('deaths')}, "
        f"messages dropped {faulty.extra.get('messages_dropped')}, "
        f"updates_duplicated {faulty.updates_duplicated}"
    )
    gap = 100 * (clean.final_accuracy - faulty.final_accuracy)
    print(f"fault_accuracy_gap: {gap:.2f} points")


if __name__ == "__main__":
    main()
