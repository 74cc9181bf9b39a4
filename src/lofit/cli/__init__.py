"""The command line: `lofit run | select | train | eval | merge | data` (entry point `lofit.cli.main:main`).

| module | job |
|---|---|
| `main` | the parser and `main()`: options in, exit status out (no torch before a command runs) |
| `options` | `RunOptions`: what a command was asked to do, validated (imports no torch) |
| `inputs` | what a command reads, with errors that name the option or file to fix |
| `steps` | the steps shared by `run` and the subcommands |
| `pipeline` | `lofit run`: select -> train -> evaluate -> write artefacts |
| `report` | `report.md` |
"""
