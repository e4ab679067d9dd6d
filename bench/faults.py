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
    deaths = report.arm("deaths-only")
    for arm in (clean, faulty, deaths):
        print(
            f"{arm.name}: final accuracy {arm.final_accuracy:.3f}, versions {arm.versions}, "
            f"deaths {arm.extra.get('deaths')}, "
            f"messages dropped {arm.extra.get('messages_dropped')}, "
            f"updates_duplicated {arm.updates_duplicated}"
        )
    data_loss = 100 * (clean.final_accuracy - deaths.final_accuracy)
    partition = 100 * (deaths.final_accuracy - faulty.final_accuracy)
    print(f"cost of the dead sites' data (fault-free - deaths-only): {data_loss:.2f} points")
    print(f"cost of the partition on top (deaths-only - both faults): {partition:.2f} points")
    gap = 100 * (clean.final_accuracy - faulty.final_accuracy)
    print(f"fault_accuracy_gap: {gap:.2f} points")


if __name__ == "__main__":
    main()
