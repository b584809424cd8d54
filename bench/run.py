"""`make bench`: every benchmark, one after another; each writes bench/results/<name>.json."""

from __future__ import annotations

from bench import gateway_latency


def main() -> None:
    print("== gateway added latency ==")
    gateway_latency.main([])


if __name__ == "__main__":
    main()
