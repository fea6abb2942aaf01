"""``ardir.evaluate``, the module: the public names of the evaluation package :mod:`ardir.evaluation`, re-exported.

The code lives in ``ardir/evaluation/`` (the attack grammar, sample selection, report, resume state, sanity
checks and the call itself, one module each); this module keeps ``from ardir.evaluate import evaluate, Report,
EvaluationWarning, list_attacks, parse_attack`` working. ``ardir.evaluate`` as an attribute of ``ardir`` is the
function :func:`ardir.evaluation.run.evaluate`; ``importlib.import_module("ardir.evaluate")`` gives this module.
"""
from .evaluation import (ATTACKS, DEFAULT_ATTACKS, MASKING_CODES, AttackSpec, Context, EvaluationWarning, Report,
                         Runner, SanityFlag, evaluate, list_attacks, parse_attack, register_attack)

__all__ = ["evaluate", "Report", "SanityFlag", "EvaluationWarning", "list_attacks", "parse_attack",
           "register_attack", "ATTACKS", "AttackSpec", "Context", "Runner", "DEFAULT_ATTACKS", "MASKING_CODES"]
