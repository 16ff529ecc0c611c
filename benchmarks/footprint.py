"""What an expert costs to hold: start-up time to /ready and resident memory (a benchmark).

    .venv/bin/python benchmarks/footprint.py [--runs 2]

Serves the default configuration (no config file) and each zoo expert alone with its defaults,
on a warm model cache (run `make pull` first; the first run also converts Gemma), and reports the
seconds from process start to `/ready` answering 200 and the server's resident memory then.
Median of ``--runs`` starts. Writes benchmarks/results/footprint.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from speed import (
    free_port,
    machine_info,
    stop_server,
    turnout_command,
    wait_ready,
)  # benchmarks/ is on sys.path as a script
from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS: dict[str, dict[str, Any] | None] = {
    "default (no config file)": None,
    "smollm2-135m": {"experts": [{"name": "smollm2-135m", "model": "smollm2-135m-instruct"}]},
    "gemma3-270m": {"experts": [{"name": "gemma3-270m", "model": "gemma3-270m"}]},
    "smollm2-small": {"experts": [{"name": "smollm2-small", "model": "smollm2-small"}]},
    "r2r": {"experts": [{"name": "r2r", "r2r": {}}]},
    "every zoo expert and r2r behind auto": {
        "experts": [
            {"name": "smollm2-135m", "model": "smollm2-135m-instruct"},
            {"name": "gemma3-270m", "model": "gemma3-270m"},
            {"name": "smollm2-small", "model": "smollm2-small"},
            {"name": "r2r", "r2r": {}},
        ],
        "router": {"coe": {}},
    },
}


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_once(config: dict[str, Any] | None, directory: Path) -> tuple[float, float]:
    """(seconds to ready, resident MiB when ready) for one start of ``config``."""
    port = free_port()
    command = [*turnout_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if config is not None:
        path = directory / f"footprint-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        command += ["--config", str(path)]
    log = directory / f"footprint-{port}.log"
    with log.open("wb") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", log)
        return time.perf_counter() - start, resident_mib(proc.pid)
    finally:
        stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="turnout-footprint-") as directory:
        for name, config in tqdm(CONFIGS.items(), desc="configurations", unit="config"):
            starts = [start_once(config, Path(directory)) for _ in range(args.runs)]
            rows[name] = {
                "ready_s": statistics.median(s for s, _ in starts),
                "resident_mib": statistics.median(m for _, m in starts),
            }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "footprint.json").write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")
    print("| configuration | ready in (s) | resident memory (MiB) |\n|---|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['ready_s']:.1f} | {row['resident_mib']:,.0f} |")


if __name__ == "__main__":
    main()
