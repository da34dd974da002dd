"""The small classification API over ``daft_mm.core``: fine-tune and evaluate torch classifiers."""
from .datasets import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, list_classes
from .demo_data import generate_demo_datasets
from .models import ARCHS, ResNet, build_resnet, load_torchvision_state_dict
from .training import (FineTuneRun, StageLog, StepInfo, default_pretrained, evaluate,
                       evaluate_loss, finetune, head_modules)

__all__ = [
    'IMAGENET_MEAN', 'IMAGENET_STD', 'ImageFolder', 'list_classes', 'generate_demo_datasets',
    'ARCHS', 'ResNet', 'build_resnet', 'load_torchvision_state_dict',
    'FineTuneRun', 'StageLog', 'StepInfo', 'default_pretrained', 'evaluate', 'evaluate_loss',
    'finetune', 'head_modules',
]
