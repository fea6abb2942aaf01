"""ardir: adversarially robust knowledge distillation with internal representations, and its baselines.

Public API::

    ardir.Trainer (= ardir.ARDIRTrainer), ardir.ATTrainer, ardir.TRADESTrainer, ardir.ARDTrainer,
    ardir.IADTrainer, ardir.RSLADTrainer    -- one loop, any method
    ardir.PGD                                -- L-inf PGD with a selectable loss
    ardir.evaluate, ardir.list_attacks       -- natural / FGSM / PGD / CW / AutoAttack report with sanity checks
    ardir.FeatureHooks                       -- outputs of named modules
    ardir.describe_layers                    -- every named module, its type and output shape on a sample
    ardir.models.create                      -- model zoo (CIFAR ResNets, WRN, MobileNetV2, CNNs, timm)
    ardir.methods                            -- the methods: inner maximisation + outer loss
    ardir.Registry                           -- the idiom of everything built by name: methods.METHODS,
                                                models.MODELS, data.DATASETS, evaluation.attacks.ATTACKS
    ardir.teachers.load_teacher              -- a frozen teacher from a checkpoint, a name, robustbench:NAME or a
                                                shipped one (ardir.zoo: fashion-mnist:cnn_xlarge-at)
    ardir.gpu_data.GPULoader                 -- a data set kept on the GPU, augmented there
    ardir.distributed                        -- torchrun: init, the loaders' shards, rank 0 writes
"""
from . import data, distributed, gpu_data, losses, methods, models, teachers, tensorboard, zoo
from .attacks import PGD
from .evaluate import EvaluationWarning, Report, evaluate, list_attacks
from .hooks import FeatureHooks, describe_layers
from .methods import (ARD, ARDIR, AT, IAD, MTARD, RSLAD, TRADES, AdaAD, Method, Natural, create_method,
                      list_methods)
from .registry import Registry
from .trainer import ARDIRTrainer, ARDTrainer, ATTrainer, IADTrainer, RSLADTrainer, TRADESTrainer, Trainer

__version__ = "0.1.0"

__all__ = [
    "Trainer", "ARDIRTrainer", "ATTrainer", "TRADESTrainer", "ARDTrainer", "IADTrainer", "RSLADTrainer",
    "PGD", "FeatureHooks", "describe_layers", "evaluate", "Report", "EvaluationWarning", "list_attacks", "data", "Method", "Natural",
    "AT", "TRADES", "ARD", "IAD", "RSLAD", "ARDIR", "AdaAD", "MTARD", "create_method", "list_methods", "Registry", "models", "methods", "losses",
    "teachers", "zoo", "gpu_data", "distributed", "tensorboard",
]
