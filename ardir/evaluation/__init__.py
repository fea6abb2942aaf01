"""Robust-accuracy evaluation a paper can cite: natural, FGSM, PGD, CW-inf and AutoAttack, with sanity checks.

One call::

    report = ardir.evaluate(model, test_loader, eps=8/255)   # natural, fgsm, pgd20, cw30, autoattack
    print(report.to_markdown())
    report.save("results/resnet18_ardir")                    # .md and .json (RobustBench-style)

Protocol (the one of ARD, RSLAD, IAD and RobustBench): L-inf threat model, images in [0, 1] (normalisation
belongs inside the model); every attack runs only on the points the model classifies correctly, so a sample
counts as robust to an attack only if it is classified correctly both naturally and after the attack, and
the *worst case* is the per-sample AND over every attack. The model is evaluated in eval mode and every
module's train/eval flag is restored afterwards; its parameters are not touched (no ``.grad`` is left).

Attack names form a small grammar (see :func:`list_attacks`):

=============  =====================================================================================
natural        no attack (always evaluated, it is the base of every other number)
fgsm           one signed-gradient step of size eps on the cross-entropy, no random start
pgdN           N steps of PGD on the cross-entropy, uniform random start, step ``step_size``
cwN            CW-inf: N steps of PGD on the CW margin ``max_{j!=y} z_j - z_y``, uniform random start
autoattack     AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (see :mod:`ardir.autoattack`)
apgd-ce, ...   one AutoAttack component alone: apgd-ce, apgd-dlr, apgd-t, fab-t, square
=============  =====================================================================================

``step_size`` defaults to ``eps / 4``, i.e. 2/255 at the standard eps = 8/255.

Sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness", arXiv 1902.06705; AutoAttack's
flags): every failed check adds a :class:`SanityFlag` to ``report.flags`` and issues an
:class:`EvaluationWarning` in plain language. See ``docs/evaluation.md`` for the exact rules.

The package, one module per concern: :mod:`~ardir.evaluation.attacks` (the attack grammar; add an attack there
with :func:`~ardir.evaluation.attacks.register_attack`), :mod:`~ardir.evaluation.selection` (which samples),
:mod:`~ardir.evaluation.report` (:class:`Report`), :mod:`~ardir.evaluation.state` (the resume state),
:mod:`~ardir.evaluation.checks` (one function per sanity rule) and :mod:`~ardir.evaluation.run` (the call).
``ardir.evaluate`` (the module) re-exports the public names.
"""
from .attacks import ATTACKS, AttackSpec, Context, Runner, list_attacks, parse_attack, register_attack
from .report import MASKING_CODES, EvaluationWarning, Report, SanityFlag
from .run import DEFAULT_ATTACKS, evaluate

__all__ = ["evaluate", "Report", "SanityFlag", "EvaluationWarning", "list_attacks", "parse_attack",
           "register_attack", "ATTACKS", "AttackSpec", "Context", "Runner", "DEFAULT_ATTACKS", "MASKING_CODES"]
