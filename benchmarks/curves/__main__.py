"""`python -m benchmarks.curves`: see `benchmarks.curves.run`."""

from .run import main

if __name__ == "__main__":
    raise SystemExit(main())
