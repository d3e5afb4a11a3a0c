"""TFDS round trip on local files (needs the tfds extra; skipped without it) and the missing-extra error."""

import sys

import pytest

from teams_rl_jax.data import Example, read_dataset
from teams_rl_jax.data.tfds_io import import_tfds, read_tfds, tfds_available, write_tfds
from teams_rl_jax.errors import ConfigError, DataError

META = {"seed_id": 3, "ops": ["deepening"], "step": 1, "queries": {"instructor": 1, "reviewer": 1, "expert": 1}}
EXAMPLES = [
    Example("Evolved instruction", "Expert answer", "ctx", meta=META),
    Example("Plain — ünïcode ✓", "Answer\nwith lines"),
    Example("and the sun?", "It is hot.", history=(("Is the moon far?", "Yes."),), system="Be brief."),
]


def test_missing_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"tfds extra .*pip install 'teams-rl-jax\[tfds\]'"):
        import_tfds()
    assert not tfds_available()


@pytest.mark.skipif(not tfds_available(), reason="tfds extra not installed (pip install 'teams-rl-jax[tfds]')")
def test_tfds_round_trip(tmp_path):
    bdir = write_tfds(EXAMPLES, tmp_path / "tfds", name="teams_rl_test", version="1.0.0")
    assert bdir.endswith("teams_rl_test/1.0.0")
    assert read_tfds(bdir) == EXAMPLES  # order, text, history, system and meta all kept
    assert read_dataset(tmp_path / "tfds") == EXAMPLES  # auto: a directory is a TFDS dataset; finds name/version
    assert read_dataset(bdir, "tfds", split="train") == EXAMPLES
    with pytest.raises(DataError, match="no split 'test'"):
        read_tfds(bdir, split="test")
    with pytest.raises(DataError, match="TFDS dataset dir not found"):
        read_tfds(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected one TFDS dataset"):
        read_dataset(tmp_path / "empty")
