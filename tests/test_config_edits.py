"""Editing a field of a script's Config in the file is the same as passing its flag: the same checked settings, the
same run name, and a refusal names the setting the way the user set it. Each case edits a real copy of the script
(the default on the field's line replaced) and imports it, as a user's edited file would run."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
from conftest import REPO, default_name

import experiment

# (script, field, the default written in the file, the flags that mean the same)
EDITS = [
    ("single", "primary_level", "3", ["--primary-level", "3"]),
    ("single", "dataset", '"cifar10"', ["--dataset", "cifar10"]),
    ("single", "lr", "0.02", ["--lr", "0.02"]),
    ("human", "lr", "0.005", ["--lr", "0.005"]),
    ("human", "primary_level", "10", ["--primary-level", "10"]),
    ("maxl", "primary_level", "10", ["--primary-level", "10"]),
    ("maxl", "entropy_weight", "0.1", ["--entropy-weight", "0.1"]),
    ("maxl", "psi", "[4, 6] * 10", ["--psi", "4,6,4,6,4,6,4,6,4,6,4,6,4,6,4,6,4,6,4,6"]),
    ("maxl", "dataset", '"cifar10"', ["--dataset", "cifar10"]),
    ("maxl", "meta_grad", '"finite-difference"', ["--meta-grad", "finite-difference"]),
    ("wamal", "primary_level", "3", ["--primary-level", "3"]),
    ("wamal", "psi", "[2] * 20", ["--psi", "2"]),
    ("wamal", "weight_range", "4.0", ["--weight-range", "4"]),
    ("maoal", "mode", '"gcs"', ["--mode", "gcs"]),
    ("maoal", "primary_level", "3", ["--primary-level", "3"]),
    ("maoal", "task", '"domains"', ["--task", "domains"]),
]


def edited_script(tmp_path, name: str, field: str, value: str):
    """A copy of model_vgg_<name>.py whose Config field `field` defaults to `value`, imported as a module. A shared
    setting (RunConfig's, e.g. dataset) is set in Config by a line of its own, as a user would add it."""
    text = (REPO / f"model_vgg_{name}.py").read_text()
    at = text.index("class Config(RunConfig):")
    match = re.search(rf"\n    {field}: [^=]+ = option\(\s*([^,]+),", text[at:])
    if match:
        start, stop = at + match.start(1), at + match.end(1)
        text = text[:start] + value + text[stop:]
    else:
        first_field = at + re.search(r"\n\n    [a-z_]+: ", text[at:]).start()
        text = text[:first_field] + f"\n\n    {field}: str = option({value}, 'set in the file')" + text[first_field:]
    path = tmp_path / f"edited_{name}_{field}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, field, value, flags", EDITS, ids=[f"{e[0]}-{e[1]}" for e in EDITS])
def test_a_config_edit_is_the_same_as_its_flag(tmp_path, name, field, value, flags):
    original = __import__(f"model_vgg_{name}")
    edited = edited_script(tmp_path, name, field, value)
    from_file = edited.check_config(experiment.parse_flags(edited.Config, []))
    from_flags = original.check_config(experiment.parse_flags(original.Config, flags))
    assert experiment.settings(from_file) == experiment.settings(from_flags)
    assert default_name(edited, from_file) == default_name(original, from_flags)


def test_a_refusal_names_the_field_edited_in_the_file_or_the_flag_given(tmp_path):
    edited = edited_script(tmp_path, "maxl", "psi", "[2, 3]")
    with pytest.raises(experiment.UsageError, match=re.escape("psi in Config has 2 entries")):
        edited.check_config(experiment.parse_flags(edited.Config, []))
    # The psi in the file stays when a level is given by flag, as a flag would: right for three primary classes.
    with pytest.raises(
        experiment.UsageError, match=re.escape("psi in Config has 2 entries but the primary task has 3")
    ):
        edited.check_config(experiment.parse_flags(edited.Config, ["--primary-level", "3"]))
    # A flag overrides the file, and its message names the flag.
    with pytest.raises(experiment.UsageError, match=re.escape("--psi has 3 entries but the primary task has 20")):
        edited.check_config(experiment.parse_flags(edited.Config, ["--psi", "1,2,3"]))
    single = edited_script(tmp_path, "single", "primary_level", "3")
    with pytest.raises(experiment.UsageError, match="primary_level = 3 in Config picks a level of CIFAR-100") as info:
        single.check_config(experiment.parse_flags(single.Config, ["--dataset", "cifar10"]))
    assert str(info.value).endswith("set primary_level = None in Config")
