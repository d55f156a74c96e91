"""gptexp's population-based training sweeper as a Hydra plugin: Hydra imports every module of
the ``hydra_plugins`` namespace package and takes sweepers from there only (the search is
gptexp.run.pbt_sweeper)."""
