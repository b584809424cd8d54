"""`make bench`: every benchmark, one after another; each writes bench/results/<name>.json.

``python -m bench.run --quick`` runs them at a smaller scale (100,000 items, 1,000,000 rows)
for development; the figures in bench/README.md come from the full run.
"""

from __future__ import annotations

import argparse

from bench import dedup, gateway_latency, ingest, query


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller scale, a few minutes")
    args = parser.parse_args(argv)
    print("== gateway added latency ==")
    gateway_latency.main(["--requests", "200"] if args.quick else [])
    print("== register ingest, end to end ==")
    ingest.main(["--items", "100000"] if args.quick else [])
    print("== list and get latency ==")
    query.main(["--rows", "1000000", "--runs", "50"] if args.quick else [])
    print("== the worker's deduplication lookup, as a project grows ==")
    dedup.main(["--sizes", "200000,1000000"] if args.quick else [])


if __name__ == "__main__":
    main()
