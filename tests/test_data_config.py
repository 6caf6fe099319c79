"""One data-side config: `distill` and `cache-logits` inherit the same fields, descriptions,
length check and prompt template from DataConfig, and stay flat in YAML, flags and config.yaml."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from kdtool.cache import CacheConfig
from kdtool.cli_cache import SHARED_FIELDS
from kdtool.config import DistillConfig, resolve
from kdtool.data import PROMPT_TEMPLATE, PROMPT_TEMPLATE_WITH_INPUT, Template
from kdtool.data_config import DataConfig
from kdtool.errors import UserError

DATA_FIELDS = {
    "data",
    "prompt_field",
    "response_field",
    "skip_bad_lines",
    "max_length",
    "max_prompt_length",
    "template_no_input",
    "template_with_input",
    "template",
}


def distill(**kw) -> DistillConfig:
    return resolve(None, dict(objective="sft", student="S", data="d.jsonl", output="o", **kw))


def cache(**kw) -> CacheConfig:
    return CacheConfig(teacher="T", data="d.jsonl", output="c", **kw)


@pytest.mark.parametrize("cls", [DistillConfig, CacheConfig])
def test_both_configs_take_the_data_fields_from_data_config(cls):
    assert issubclass(cls, DataConfig) and set(DataConfig.model_fields) == DATA_FIELDS
    for name, field in DataConfig.model_fields.items():
        assert repr(cls.model_fields[name]) == repr(field), name  # same default, bounds, description
        assert field.description, name


def test_cache_logits_reads_exactly_the_data_fields_of_a_distill_config():
    assert set(SHARED_FIELDS) == DATA_FIELDS | {"teacher", "device", "trust_remote_code"}
    assert len(SHARED_FIELDS) == len(set(SHARED_FIELDS))


def test_template_is_the_default_with_the_custom_strings_in_place():
    for cfg in (distill(), cache()):
        assert cfg.prompt_template() == Template(PROMPT_TEMPLATE, PROMPT_TEMPLATE_WITH_INPUT)
    custom = {"template_no_input": "Q: {instruction}\nA: "}
    for cfg in (distill(**custom), cache(**custom)):
        assert cfg.prompt_template() == Template("Q: {instruction}\nA: ", PROMPT_TEMPLATE_WITH_INPUT)
    both = {**custom, "template_with_input": "Q: {instruction} ({input})\nA: "}
    assert cache(**both).prompt_template() == distill(**both).prompt_template() == Template(*both.values())


def test_the_length_check_applies_to_both_commands_beside_their_own_checks():
    with pytest.raises(UserError, match="max_prompt_length must be smaller than max_length"):
        distill(max_length=64, max_prompt_length=64)
    with pytest.raises(ValueError, match="max_prompt_length must be smaller than max_length"):
        cache(max_length=64, max_prompt_length=80)
    # the subclasses' own validators still run
    with pytest.raises(ValueError, match="not both"):
        cache(top_k=4, top_fraction=0.1)
    with pytest.raises(UserError, match="needs --teacher or --teacher-cache"):
        resolve(None, dict(objective="fkl", student="S", data="d.jsonl", output="o"))


def test_saved_config_stays_flat_with_every_data_field_at_the_top_level():
    cfg = distill(max_length=128, skip_bad_lines=True)
    saved = yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    assert set(saved) >= DATA_FIELDS and saved["max_length"] == 128 and saved["skip_bad_lines"] is True
    assert not any(isinstance(v, dict) for k, v in saved.items() if k != "objective_options")
    assert DistillConfig.model_validate(saved) == cfg  # a saved config.yaml reads back as it was


def test_importing_the_configs_imports_neither_torch_nor_the_cache():
    code = (
        "import sys, kdtool.config, kdtool.data_config; "
        "print(sorted(m for m in ('torch', 'kdtool.cache', 'kdtool.data') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
