"""The paper's tables on one model, every baseline in the same harness: `python -m benchmarks.paper`.

Modules: `run` (the plan of units and the command line), `units` (one function per experiment),
`render` (markdown tables and heatmaps), `check_ood` (`python -m benchmarks.paper.check_ood`: how close
rebuilt out-of-domain adapters are to the units they were rebuilt from).
"""
