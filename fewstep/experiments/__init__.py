"""The experiment drivers behind docs/RESULTS.md: each runs the `fewstep` commands (or the
training loop) over its arms and seeds and writes a summary. Above the command in the layers
(pyproject.toml's import-linter contracts); scripts/ holds their entry points."""
