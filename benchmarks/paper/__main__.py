"""`python -m benchmarks.paper`: see `benchmarks.paper.run`."""

from .run import main

if __name__ == "__main__":
    raise SystemExit(main())
