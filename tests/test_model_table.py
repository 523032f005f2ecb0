"""The README's model table is generated from the registry and the experiment configs, and kept current."""
from zoo import model_table

from conftest import ROOT


def test_readme_model_table_is_generated_and_current():
    readme = (ROOT / "README.md").read_text()
    expected = model_table.markdown(model_table.rows())
    assert model_table.read_block(readme) == expected, "run: python -m zoo table --write README.md"


def test_recipes_are_found_from_the_experiment_configs(tmp_path):
    (tmp_path / "a_digits.yaml").write_text("defaults:\n  - override /model: halonet_tiny\n  - override /data: digits\n")
    (tmp_path / "b.yaml").write_text("defaults:\n  - override /data: digits\n")
    assert model_table.recipes(tmp_path) == {"halonet_tiny": ["a_digits"]}


def test_table_row_has_params_flops_and_paper_numbers():
    (row,) = model_table.rows(["biformer_small"])
    assert row["params_m"] == 25.536 and abs(row["gmacs"] - 4.464) < 0.01
    assert "83.8" in row["paper"] and "biformer_small_imagenet" in row["recipes"]
    assert model_table.replace_block("x\n<!-- model-table:start -->\nold\n<!-- model-table:end -->\ny", "new") == \
        "x\n<!-- model-table:start -->\nnew\n<!-- model-table:end -->\ny"
