"""Time to accuracy: FedBuff against FedAvg and FedAsync (issue 2, figure 3).

Runs ``scenarios/fedbuff-vs-fedavg.toml``: Synthetic(1,1) over 1,000 sites, half-normal
job durations, 100 sites training at once, 10% dropouts. Every arm sweeps its client
learning rate and keeps its best run. Prints the virtual time each arm needs to reach the
target accuracy and FedBuff's speed-up over the other two (the FedBuff paper reports 3.3x
over synchronous FL and 2.5x over asynchronous FL).

    .venv/bin/python bench/time_to_accuracy.py
"""

from __future__ import annotations

import math

from _common import run


def main() -> None:
    report = run("fedbuff-vs-fedavg.toml")
    arms = {a.name: a for a in report.arms}

    def ttt(name: str) -> float:
        t = arms[name].time_to_target_s
        return math.inf if t is None else t

    for name in ("fedavg", "fedasync", "fedbuff"):
        t = ttt(name)
        shown = "never" if math.isinf(t) else f"{t / 3600:.2f} h"
        first = float(arms[name].extra.get("first_crossing_s", -1))
        first_shown = "never" if first < 0 else f"{first / 3600:.2f} h"
        print(
            f"{name}: sustained (30-min mean) {report.arms[0].target_accuracy} at {shown}; "
            f"first single evaluation at {first_shown}; lr {arms[name].extra['lr']}"
        )
    vs_avg = ttt("fedavg") / ttt("fedbuff")
    vs_async = ttt("fedasync") / ttt("fedbuff")
    print(f"fedbuff_speedup_vs_fedasync: {vs_async:.2f} x")
    print(f"fedbuff_speedup_vs_fedavg: {vs_avg:.2f} x")


if __name__ == "__main__":
    main()
