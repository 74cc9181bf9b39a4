"""`python -m benchmarks.speed`: see `benchmarks.speed.run`."""

from .run import main

if __name__ == "__main__":
    main()
