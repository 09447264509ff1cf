"""Config files: what py_config_runner hands a script, read without loading the config."""

from pathlib import Path

from py_config_runner import ConfigObject

from vocseg.config import config_source, literal_constants, peek_constant

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/configs/tiny.py"


def test_config_source_reads_paths_and_mutations_without_loading():
    # Fails loudly if a py_config_runner upgrade moves the attributes config_source() reads.
    config = ConfigObject(
        TINY, mutations={"seed": 11, "device": "cpu", "lr": 0.5}, script_filepath=ROOT / "code/scripts/training.py"
    )
    source = config_source(config)
    assert source.config_path == TINY and source.script_path == ROOT / "code/scripts/training.py"
    assert source.mutations == {"seed": 11, "device": "cpu", "lr": 0.5}
    assert "model" not in config.__dict__["__internal_config_object_data_dict__"]  # nothing was evaluated


def test_config_source_without_mutations_or_script():
    source = config_source(ConfigObject(TINY))
    assert source == (TINY, None, {}, {})


def test_constants_are_the_literal_assignments_and_mutations_win():
    constants = literal_constants(TINY)
    assert constants["seed"] == 7 and constants["device"] == "cpu" and "model" not in constants
    assert peek_constant(TINY, "seed", {"seed": 3}) == 3 and peek_constant(TINY, "missing", default=5) == 5
