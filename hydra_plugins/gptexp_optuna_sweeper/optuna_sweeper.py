"""``hydra/sweeper=optuna``: registers the config schema and its samplers (tpe, random, cmaes,
nsgaii, grid) and names the sweeper class where Hydra looks for it. Optuna itself is imported
only when a search starts."""

import gptexp.run.optuna_sweeper as search

search.register_sweeper_configs()


class OptunaSweeper(search.OptunaSearch):
    """gptexp.run.optuna_sweeper.OptunaSearch, under the name Hydra instantiates."""
