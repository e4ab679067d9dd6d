"""Codec savings on the default hospitals scenario (issue 2, figure 7).

Runs the hierarchical FedBuff arms of ``scenarios/hospitals.toml`` with fp32, fp16 and int8
deltas and prints the uplink byte reduction against fp32 and the accuracy difference
(targets: >= 1.9x for fp16, >= 3.5x for int8, accuracy within 0.5 points).

    .venv/bin/python bench/codec.py
"""

from __future__ import annotations

from _common import run


def main() -> None:
    report = run("hospitals.toml", arms=["hier-fedbuff", "hier-fedbuff-fp16", "hier-fedbuff-int8"])
    fp32 = report.arm("hier-fedbuff")
    lines = []
    for name, label in (("hier-fedbuff-fp16", "fp16"), ("hier-fedbuff-int8", "int8")):
        arm = report.arm(name)
        ratio = fp32.bytes_up / arm.bytes_up
        delta = 100 * (arm.final_accuracy - fp32.final_accuracy)
        print(
            f"{label}: uplink bytes {arm.bytes_up:,} vs fp32 {fp32.bytes_up:,}; "
            f"accuracy {delta:+.2f} points"
        )
        lines.append(f"codec_{label}_byte_reduction: {ratio:.2f} x")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
