"""The package's Hydra configs (found from the source tree or an installed wheel); `compose` reads one outside a
Hydra job. Kept here, below `config` and `config_checks`, so both can compose without importing each other."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent


def compose(config_name: str, overrides: list[str], hydra_config: bool = False):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module("pixsig_distill.conf", version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=hydra_config)
