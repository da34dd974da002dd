"""The framework-agnostic DAFT core: imports torch only, never mmengine."""
from .conversion import (ConversionError, ConversionReport, LayerReport, convert_bn,
                         default_forward, find_batchnorms, refuse_non_batchnorms,
                         split_batchnorms)
from .distortion import (QUANTITIES, ChangeReport, FeatureSimilarity, LayerChange,
                         feature_similarity, pairwise_cosine, relative_change)
from .heads import (PREDICTOR_TYPES, find_predictors, flush_subnormals, freeze_feature_extractor,
                    head_modules, is_predictor_leaf, new_modules, resolve_modules, set_bn_eval,
                    split_param_groups, zero_init_predictors)
from .interpolation import interpolate_states, mix_with_statistics
from .modules import has_running_stats, is_batchnorm, kept_modes
from .plan import Plan, Preparation, make_plan, prepare
from .recipes import (CONVERT_SCOPES, DAFT_HEAD_LR_MULT, HEAD_SCOPES, RECIPE_ALIASES, RECIPES,
                      FineTuneRecipe, FineTuneStage, get_recipe, recipe_name)
from .stats import VAR_MODES, ChannelAccumulator, ChannelMoments

__all__ = [
    'ConversionError', 'ConversionReport', 'LayerReport', 'convert_bn', 'default_forward',
    'find_batchnorms', 'refuse_non_batchnorms', 'split_batchnorms', 'Plan', 'Preparation',
    'make_plan', 'prepare', 'interpolate_states', 'mix_with_statistics', 'VAR_MODES', 'ChannelAccumulator', 'ChannelMoments',
    'has_running_stats', 'is_batchnorm', 'kept_modes',
    'PREDICTOR_TYPES', 'is_predictor_leaf', 'find_predictors', 'flush_subnormals',
    'freeze_feature_extractor', 'head_modules', 'new_modules', 'resolve_modules', 'set_bn_eval',
    'split_param_groups', 'zero_init_predictors',
    'QUANTITIES', 'ChangeReport', 'FeatureSimilarity', 'LayerChange', 'feature_similarity',
    'pairwise_cosine', 'relative_change',
    'CONVERT_SCOPES', 'DAFT_HEAD_LR_MULT', 'HEAD_SCOPES', 'RECIPES', 'FineTuneRecipe',
    'FineTuneStage', 'RECIPE_ALIASES', 'get_recipe', 'recipe_name',
]
