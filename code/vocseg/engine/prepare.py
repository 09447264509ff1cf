"""What training and evaluation do before their own work: check the settings, seed, load and check the config,
check the data, make the run folder and its log."""

import logging

from vocseg import outputs
from vocseg.config import check_constants, check_loaded, check_seed, load_config, peek_constant
from vocseg.data import sample_check
from vocseg.runtime import logs, machine


def prepare(config_path, mutations, what: str, loaders, schema, first=None, output_dir=None, name=None):
    """The loaded config, its seed, the run folder and the run's logger.

    ``loaders``: label -> the config's key of each loader the sample check reads; ``schema``: py_config_runner's
    check of the keys that ``what`` (training, evaluation) needs; ``first(config)``: a check whose message beats
    the schema's."""
    check_constants(config_path, mutations)  # literals and overrides, before anything is built
    seed = int(peek_constant(config_path, "seed", mutations, default=0))
    machine.seed_everything(seed)  # before the config builds its model
    config = load_config(config_path, mutations)
    if first is not None:
        first(config)
    schema(config)
    check_seed(config, seed)
    check_loaded(config, config_path)
    checked = sample_check.check_loaders({label: config.get(key) for label, key in loaders.items()})
    output_dir = outputs.make_output_dir(config_path, output_dir, name)
    logger: logging.Logger = logs.setup_logging(output_dir)
    logger.info("before %s: %s", what, checked)
    return config, seed, output_dir, logger
