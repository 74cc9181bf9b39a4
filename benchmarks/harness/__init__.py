"""What the benchmarks share.

- `benchmarks.harness.units`: `Settings` (whose hash keys a result), seeded data subsets and the
  `Harness` that runs cached, resumable *units* and keeps a results JSON (paper, curves, composition);
- `benchmarks.harness.environment`: the machine and library versions a result was measured with;
- `benchmarks.harness.stats`: means, standard errors, overlaps, seeded samples;
- `benchmarks.harness.commits`: committing a finished result file at once (resumable long runs);
- `benchmarks.harness.internals`: the one door to lofit below its public API.
"""
