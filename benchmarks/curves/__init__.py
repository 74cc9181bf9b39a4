"""The paper's Fig. 4 (data efficiency) and Fig. 5 (number of heads) on one model: `python -m benchmarks.curves`.

Modules: `run` (the plan of units, one JSON file each, and the command line), `render` (tables and
plots from the unit files). `run_all.sh` runs every chunk of the committed run, resumably.
"""
