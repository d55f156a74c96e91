"""``hydra/sweeper=pbt``: registers the config schema and names the sweeper class where Hydra
looks for it."""

import gptexp.run.pbt_sweeper as search

search.register_sweeper_configs()


class PBTSweeper(search.PBTSearch):
    """gptexp.run.pbt_sweeper.PBTSearch, under the name Hydra instantiates."""
