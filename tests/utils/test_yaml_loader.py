"""The one YAML loader (megatron_outeff.utils.yaml_loader): PyYAML's SafeLoader that refuses a key written
twice in one mapping, naming the key and both lines (issue 19 item 6), at any depth."""

import pytest

from megatron_outeff.errors import OutEffError
from megatron_outeff.utils.yaml_loader import load_yaml, load_yaml_file


def test_plain_documents_load_as_safe_load_does():
    import yaml

    text = "a: 1\nb: {c: [1, 2.5, null, true], d: 'x'}\nlist:\n  - {k: 1}\n  - {k: 2}\n"
    assert load_yaml(text, "t") == yaml.safe_load(text)
    assert load_yaml("", "t") is None


@pytest.mark.parametrize(
    "text, line, key, first",
    [
        ("train: {a: 1}\nmodel: {}\ntrain: {b: 2}\n", 3, "train", 1),  # top level: a block replaced
        ("train:\n  seed: 1\n  iters: 2\n  seed: 3\n", 4, "seed", 2),  # nested
        ("a: {x: 1, x: 2}\n", 1, "x", 1),  # flow mapping
        ("l:\n  - {k: 1}\n  - k: 2\n    k: 3\n", 4, "k", 3),  # inside a list
        ("1: a\n1: b\n", 2, 1, 1),  # non-string keys
    ],
)
def test_duplicate_key_is_one_line_naming_key_and_both_lines(text, line, key, first):
    with pytest.raises(OutEffError) as e:
        load_yaml(text, "cfg.yaml")
    assert str(e.value) == (
        f"cfg.yaml:{line}: duplicate key {key!r} (first at line {first}); expected each key once per mapping"
    )


def test_merge_keys_may_be_overridden():
    """``<<: *base`` then an explicit key: YAML's own override, not a duplicate."""
    doc = load_yaml("base: &b {lr: 1, wd: 2}\nrun:\n  <<: *b\n  lr: 3\n", "t")
    assert doc["run"] == {"lr": 3, "wd": 2}


def test_syntax_error_and_file_errors_are_one_line(tmp_path):
    with pytest.raises(OutEffError, match=r"^t:2: invalid YAML \(mapping values are not allowed here\)$"):
        load_yaml("ok: 1\na: b: c\n", "t")
    with pytest.raises(OutEffError, match="no such file"):
        load_yaml_file(tmp_path / "missing.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"a: caf\xe9\n")
    with pytest.raises(OutEffError, match="not UTF-8"):
        load_yaml_file(tmp_path / "latin1.yaml")
    (tmp_path / "d.yaml").write_text("k: 1\nk: 2\n")
    with pytest.raises(OutEffError, match=r"d\.yaml:2: duplicate key 'k' \(first at line 1\)"):
        load_yaml_file(tmp_path / "d.yaml")


def test_every_product_reader_refuses_duplicates(tmp_path):
    """The training config (file and --set), the model architecture YAML and the experiment config."""
    from megatron_outeff.evaluation.experiment import load_experiment
    from megatron_outeff.models.opt import load_arch_config
    from megatron_outeff.training.config import load_config

    (tmp_path / "t.yaml").write_text("model: {arch: tiny}\ntrain: {train_iters: 5}\ntrain: {seed: 2}\n")
    with pytest.raises(OutEffError, match=r"t\.yaml:3: duplicate key 'train' \(first at line 2\)"):
        load_config(tmp_path / "t.yaml")
    with pytest.raises(OutEffError, match=r"--set attention:1: duplicate key 'softmax'"):
        load_config(None, ["attention={softmax: softmax1, softmax: vanilla}"])
    (tmp_path / "a.yaml").write_text("arch:\n  name: x\n  hidden_size: 64\n  hidden_size: 32\n")
    with pytest.raises(OutEffError, match=r"a\.yaml:4: duplicate key 'hidden_size' \(first at line 3\)"):
        load_arch_config(tmp_path / "a.yaml")
    (tmp_path / "e.yaml").write_text("name: x\narms: [vanilla]\narms: [softmax1]\n")
    with pytest.raises(OutEffError, match=r"e\.yaml:3: duplicate key 'arms' \(first at line 2\)"):
        load_experiment(tmp_path / "e.yaml")
