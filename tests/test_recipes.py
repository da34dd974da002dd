"""daft_mm.core.recipes: the four methods as data."""
from __future__ import annotations

import dataclasses

import pytest

from daft_mm.core import RECIPES, FineTuneRecipe, FineTuneStage, get_recipe


def test_the_four_methods_and_the_two_ablations():
    assert sorted(RECIPES) == ['daft', 'daft-convert-only', 'daft-no-convert', 'ft', 'lp',
                               'lp-ft']
    for name, recipe in RECIPES.items():
        assert recipe.name == name and recipe.description


def test_ft_is_plain_fine_tuning():
    (stage,) = get_recipe('ft').stages
    assert not (stage.convert_bn or stage.zero_init_head or stage.freeze_feature_extractor)
    assert stage.bn_train and stage.head_lr_mult == 1.0


def test_lp_trains_only_the_head_with_bn_in_eval_mode():
    (stage,) = get_recipe('lp').stages
    assert stage.freeze_feature_extractor and not stage.bn_train
    assert not (stage.convert_bn or stage.zero_init_head)


def test_lp_ft_is_lp_then_ft_from_the_probed_head():
    lp, ft = get_recipe('lp-ft').stages
    assert lp == get_recipe('lp').stages[0]
    assert ft == get_recipe('ft').stages[0]
    assert not ft.zero_init_head  # FT must start from the LP head, not a reset one


def test_daft_is_one_stage_with_conversion_zero_head_and_fast_head():
    recipe = get_recipe('daft')
    (stage,) = recipe.stages
    assert recipe.uses_bn_conversion
    assert stage.convert_bn and stage.zero_init_head and stage.bn_train
    assert not stage.freeze_feature_extractor
    assert stage.head_lr_mult > 1.0
    assert not any(r.uses_bn_conversion for n, r in RECIPES.items()
                   if n not in ('daft', 'daft-convert-only'))


def test_daft_trains_every_new_module_at_the_head_lr_by_default():
    assert get_recipe('daft').stages[0].head_scope == 'new_modules'
    assert get_recipe('daft-no-convert').stages[0].head_scope == 'new_modules'
    assert get_recipe('ft').stages[0].head_scope == 'predictors'


def test_the_ablations_are_the_two_halves_of_daft():
    (no_convert,) = get_recipe('daft_no_convert').stages
    assert no_convert.zero_init_head and not no_convert.convert_bn
    assert no_convert.head_lr_mult == get_recipe('daft').stages[0].head_lr_mult
    (convert_only,) = get_recipe('daft-convert-only').stages
    assert convert_only.convert_bn and not convert_only.zero_init_head
    assert convert_only.head_lr_mult == 1.0 and convert_only.bn_train


def test_head_scope_is_validated():
    from daft_mm.core import FineTuneStage
    assert FineTuneStage('x').head_scope == 'predictors'
    FineTuneStage('x', head_scope='new_modules')
    with pytest.raises(ValueError, match='head_scope'):
        FineTuneStage('x', head_scope='heads')


@pytest.mark.parametrize('alias', ['LP-FT', 'lp_ft', 'lpft', ' Lp-Ft '])
def test_name_normalisation(alias):
    assert get_recipe(alias) is RECIPES['lp-ft']


def test_unknown_method_lists_the_choices():
    with pytest.raises(KeyError, match=r"unknown fine-tuning method 'surgical'.*'daft'"):
        get_recipe('surgical')


def test_recipes_are_immutable_and_variants_are_new_objects():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_recipe('daft').stages[0].head_lr_mult = 100.0
    with pytest.raises(TypeError):
        RECIPES['mine'] = get_recipe('ft')
    faster = dataclasses.replace(get_recipe('daft').stages[0], head_lr_mult=100.0)
    assert faster.head_lr_mult == 100.0 and get_recipe('daft').stages[0].head_lr_mult != 100.0


def test_invalid_definitions_are_rejected():
    with pytest.raises(ValueError, match='head_lr_mult'):
        FineTuneStage('x', head_lr_mult=0.0)
    with pytest.raises(ValueError, match='no stages'):
        FineTuneRecipe('empty', ())


def test_stage_iterations_give_every_method_the_same_budget():
    """One rule for the equal budget, read by the segmentation benchmark, the classification
    benchmark and tools/train_cls.py."""
    from daft_mm.core import get_recipe
    assert get_recipe('daft').stage_iterations(300) == (300, )
    assert get_recipe('lp-ft').stage_iterations(300) == (150, 150)
    assert get_recipe('lp-ft').stage_iterations(7, 0.5) == (4, 3)
    assert get_recipe('lp-ft').stage_iterations(2, 0.9) == (1, 1)  # the last stage keeps one
    with pytest.raises(ValueError, match='budget of >= 2'):
        get_recipe('lp-ft').stage_iterations(1)
