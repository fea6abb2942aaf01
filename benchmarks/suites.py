"""The benchmark suites: each one's data set, threat model, teacher, students, methods and evaluation
(:data:`SUITES`), the rows a table can hold (:data:`ROW_NAMES`), the published numbers quoted beside them
(:data:`PUBLISHED`) and the ARDIR ablation's variants (:data:`ABLATIONS`). ``reproduce.py`` runs them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import ardir

METRICS = ("natural", "fgsm", "pgd20", "cw20", "cw30", "autoattack")
HEADERS = {"natural": "Natural", "fgsm": "FGSM", "pgd20": "PGD-20", "cw20": "CW∞-20", "cw30": "CW∞-30",
           "autoattack": "AutoAttack"}
L2_HEADERS = {**HEADERS, "fgsm": "FGM", "cw20": "CW₂-20", "cw30": "CW₂-30"}  # the same attacks under L2
ALL_METHODS = ("natural", "at", "trades", "ard", "iad", "rslad", "ardir")
RECENT_METHODS = ("adaad", "mtard")  # the baselines recent papers add (MTARD needs a natural teacher too)
ROW_VARIANTS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "ard-tau1": ("ard", {"tau": 1.0, "kl_reduction": "batchmean"}),
    "ardir-ce0": ("ardir", {"w_ce": 0.0}),
}
"""Rows that run a method at other settings than its paper's: ``name -> (method, arguments)``. ``ard-tau1`` is ARD
at tau 1 with the batch-mean KL, beside ARD at its reference settings (tau 30, KL / C). ``ardir-ce0`` is ARDIR
without the CE term on x' (its first default, before the ablation chose w_ce 1): not a default row of any suite,
shown where it was run."""
ROW_NAMES = ALL_METHODS + RECENT_METHODS + tuple(ROW_VARIANTS)


def base_method(row: str) -> Tuple[str, Dict[str, Any]]:
    """The library method a row runs and the arguments that differ from its defaults."""
    method, extra = ROW_VARIANTS.get(row, (row, {}))
    return method, dict(extra)
# IAD's warm-up, 60 of ARD's 200 epochs, scaled to the suite's epochs as the library does; written into the rows
IAD_WARMUP_FRACTION = ardir.IAD.warmup_fraction


@dataclass(frozen=True)
class Suite:
    """One benchmark suite: everything needed to train and evaluate its table's rows."""
    name: str
    dataset: str
    results_name: str  # benchmarks/results/<results_name>.md
    eps: float
    step_size: float  # training attack step (PGD-`steps`)
    steps: int
    eval_step_size: float  # PGD / CW step of the evaluation
    teacher_model: str
    teacher_method: str
    teacher_epochs: Optional[int]  # None: the teacher method's paper schedule
    teacher_spec: Optional[str]  # default --teacher (None: train it)
    students: Tuple[str, ...]
    methods: Tuple[str, ...]
    epochs: Optional[int]  # students; None: each method's paper schedule (ARD 200, RSLAD 300, TRADES 100, ...)
    lr: float
    batch_size: int
    train_size: Optional[int]  # training images (None: all)
    attacks: Tuple[str, ...]  # on eval_size test images (None: the full test set)
    eval_size: Optional[int]
    aa_size: Optional[int]  # AutoAttack on a seeded random subset of this many test images (None: all; 0: skip)
    seeds: Tuple[int, ...]
    method_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    teacher_kwargs: Dict[str, Any] = field(default_factory=dict)
    eval_seed: int = 0  # seeds the AutoAttack subset and the attacks' random starts: the same for every row
    in_chans: int = 3
    num_classes: int = 10
    checks: bool = True  # evaluate()'s gradient-masking sanity checks on every row
    teacher_attacks: Optional[Tuple[str, ...]] = None  # the teacher's row (no AutoAttack); None: as the students'
    natural_teacher: Optional[str] = None  # MTARD's naturally trained teacher (a spec); None: --natural-teacher
    norm: str = "linf"  # the threat model of training and evaluation ("linf" or "l2"; eps is a radius in it)
    notes: Tuple[str, ...] = ()


# Published numbers (RSLAD, Zi et al. ICCV 2021, Tables 2 and 3, best checkpoint; full test sets, eps = 8/255).
# Columns: natural, FGSM, PGD_SAT (PGD-20 on CE), CW-inf (20 steps), AutoAttack. From
# /work/shared/reference/published_tables.md. Natural rows exist only for CIFAR-10.
_P = ("natural", "fgsm", "pgd20", "cw20", "autoattack")
PUBLISHED: Dict[str, Dict[Tuple[str, str], Dict[str, float]]] = {
    "cifar10": {(s, m): dict(zip(_P, v)) for (s, m), v in {
        ("resnet18", "natural"): (94.65, 19.26, 0.0, 0.0, 0.0),
        ("resnet18", "at"): (83.38, 56.41, 49.11, 48.67, 45.83),
        ("resnet18", "trades"): (81.93, 57.49, 52.66, 50.58, 49.23),
        ("resnet18", "ard"): (83.93, 59.31, 52.05, 51.22, 49.19),
        ("resnet18", "iad"): (83.24, 58.60, 52.21, 51.25, 49.10),
        ("resnet18", "rslad"): (83.38, 60.01, 54.24, 53.30, 51.49),
        ("mobilenet_v2", "natural"): (92.95, 14.47, 0.0, 0.0, 0.0),
        ("mobilenet_v2", "at"): (82.48, 56.44, 50.10, 49.33, 46.32),
        ("mobilenet_v2", "trades"): (80.57, 56.05, 51.06, 49.36, 47.17),
        ("mobilenet_v2", "ard"): (83.20, 58.06, 50.86, 50.39, 48.34),
        ("mobilenet_v2", "iad"): (81.91, 57.00, 51.88, 50.45, 48.40),
        ("mobilenet_v2", "rslad"): (83.40, 59.06, 53.16, 51.91, 50.17),
    }.items()},
    "cifar100": {(s, m): dict(zip(_P, v)) for (s, m), v in {
        ("resnet18", "at"): (57.46, 28.56, 24.07, 23.68, 21.79),
        ("resnet18", "trades"): (55.23, 30.48, 27.79, 25.06, 23.94),
        ("resnet18", "ard"): (60.64, 33.41, 29.16, 27.85, 25.65),
        ("resnet18", "iad"): (57.66, 33.26, 29.59, 27.37, 25.12),
        ("resnet18", "rslad"): (57.74, 34.20, 31.08, 28.34, 26.70),
        ("mobilenet_v2", "at"): (56.85, 31.95, 28.33, 26.85, 24.71),
        ("mobilenet_v2", "trades"): (56.20, 31.37, 29.21, 25.06, 24.16),
        ("mobilenet_v2", "ard"): (59.83, 33.05, 29.13, 27.86, 25.53),
        ("mobilenet_v2", "iad"): (56.14, 32.81, 29.81, 27.99, 25.74),
        ("mobilenet_v2", "rslad"): (58.97, 34.03, 30.40, 28.22, 26.12),
    }.items()},
}
PUBLISHED["cifar10"][("wrn34_10 (teacher)", "teacher")] = {"natural": 84.92, "autoattack": 53.08}
PUBLISHED["cifar100"][("resnet18", "adaad")] = {"autoattack": 28.06}  # IGDM's re-run of AdaAD (methods.md)
_RSLAD_SOURCE = ("Zi et al. 2021 (RSLAD), Table 2 (CIFAR-10, teacher TRADES WRN-34-10) and Table 3 (CIFAR-100, "
                    "teacher WRN-70-16 of Gowal et al.), 'best checkpoint' block; PGD = PGD_SAT (20 steps, CE), "
                    "CW∞ 20 steps, AA = AutoAttack standard; full 10,000-image test sets. ARDIR's own numbers are "
                    "not published anywhere we can read. Teacher row (CIFAR-10): RobustBench's Zhang2019Theoretically "
                    "(clean 84.92, AA 53.08). AdaAD (CIFAR-100, ResNet-18): AutoAttack 28.06 as re-run by IGDM; "
                    "MTARD's own tables use other baselines' re-runs and are not quoted here.")
# L2 anchors (eps = 0.5, RobustBench's L2 leaderboard, model_info/cifar10/L2/*.json: clean / AutoAttack on the full
# test set). No robust-distillation paper we can read reports CIFAR-10 L2 numbers; these place the rows.
PUBLISHED["cifar10-l2"] = {("resnet18", "at"): {"natural": 88.67, "autoattack": 67.68}}  # Rice2020Overfitting
_L2_SOURCE = ("RobustBench's CIFAR-10 L2 leaderboard (eps 0.5, AutoAttack standard, full test set), entries without "
              "extra data: the AT row is Rice2020Overfitting (ResNet-18 PGD-AT, clean 88.67, AA 67.68). For the "
              "teacher's scale: Engstrom2019Robustness (ResNet-50, 90.83 / 69.24) and Gowal2020Uncovering "
              "(WRN-70-16, 90.90 / 74.50; --teacher robustbench:L2/Gowal2020Uncovering with the robustbench "
              "package); no WRN-34-10 L2 entry without extra data exists. No distillation method has published "
              "CIFAR-10 L2 numbers we can read.")
PUBLISHED_SOURCES = {"cifar10": _RSLAD_SOURCE, "cifar100": _RSLAD_SOURCE, "cifar10-l2": _L2_SOURCE}
"""Where each suite's published numbers come from (the table's footer and its JSON's ``published_source``)."""

_CIFAR = dict(eps=8 / 255, step_size=2 / 255, steps=10, eval_step_size=2 / 255, teacher_model="wrn34_10",
              teacher_method="trades", teacher_epochs=None, students=("resnet18", "mobilenet_v2"),
              methods=ALL_METHODS + RECENT_METHODS, epochs=None, lr=0.1, batch_size=128, train_size=None,
              attacks=("natural", "fgsm", "pgd20", "cw20", "cw30"), eval_size=None, aa_size=None, seeds=(0,),
              in_chans=3)

SUITES: Dict[str, Suite] = {s.name: s for s in [
    Suite(name="cifar10", dataset="cifar10", results_name="cifar10", num_classes=10,
          teacher_spec=None, **_CIFAR,
          notes=("Protocol of ARD / RSLAD / IAD (see /work/shared/reference/methods.md): eps 8/255, PGD-10 step "
                 "2/255 for training, SGD lr 0.1 momentum 0.9 wd 2e-4, batch 128, each method's paper schedule "
                 "(AT 200, TRADES 100, ARD/IAD/ARDIR 200, RSLAD 300 epochs, lr x0.1 at the papers' fractions).",
                 "Teacher: WRN-34-10 trained with TRADES (beta 6, 100 epochs) unless --teacher is given; the "
                 "published teacher is robustbench:Zhang2019Theoretically (the TRADES WRN-34-10 checkpoint).",
                 "CW∞ is evaluated with 20 steps (the published column) and 30 (methods.md's protocol).")),
    Suite(name="cifar100", dataset="cifar100", results_name="cifar100", num_classes=100,
          teacher_spec=None, method_kwargs={"rslad": {"kl_scale": 10.0}}, **_CIFAR,
          notes=("Same protocol as cifar10; RSLAD multiplies its loss by 10 on CIFAR-100 (kl_scale=10) as its "
                 "reference code does. ARD's reference uses batch 256 on CIFAR-100; this suite keeps 128 for every "
                 "method (pass --batch-size 256 --methods ard for the ARD row as published).",
                 "The published CIFAR-100 teacher is WRN-70-16 (Gowal et al. 2020, clean 60.86 / AA 30.03); this "
                 "suite trains a TRADES WRN-34-10 by default: expect lower student numbers than published unless "
                 "--teacher points at a WRN-70-16 checkpoint.")),
    Suite(name="cifar10-l2", dataset="cifar10", results_name="cifar10_l2", num_classes=10, teacher_spec=None,
          **{**_CIFAR, "eps": 0.5, "step_size": 0.125, "eval_step_size": 0.125, "teacher_method": "at"}, norm="l2",
          notes=("The L2 threat model of RobustBench's CIFAR-10 L2 leaderboard: eps = 0.5. Training PGD-10 with step "
                 "2.5·eps/10 = 0.125 along the normalised gradient (Madry et al.'s rule, the step of the L∞ "
                 "suites); evaluation FGM, PGD-20, CW₂-20/30 (the CW margin loss under "
                 "L2 PGD) with step eps/4 = 0.125, and the standard L2 AutoAttack on the full test set. Otherwise "
                 "the cifar10 suite's protocol (SGD lr 0.1, batch 128, each method's paper schedule).",
                 "Teacher: WRN-34-10 trained with PGD-AT under L2 (200 epochs) unless --teacher is given "
                 "(e.g. robustbench:L2/Gowal2020Uncovering)."),),
    Suite(name="fashion-mnist", dataset="fashion-mnist", results_name="fashion_mnist", num_classes=10, in_chans=1,
          eps=0.1, step_size=0.025, steps=10, eval_step_size=0.025,
          teacher_model="cnn_xlarge", teacher_method="at", teacher_epochs=None,
          teacher_spec="fashion-mnist:cnn_xlarge-at",
          students=("cnn_small",), methods=ALL_METHODS + ("ard-tau1",) + RECENT_METHODS, epochs=10, lr=0.05, batch_size=128,
          train_size=5000, attacks=("natural", "fgsm", "pgd20", "cw30"), eval_size=None, aa_size=1000,
          seeds=(0, 1, 2), checks=False, teacher_attacks=("natural", "fgsm", "pgd20"),
          natural_teacher="fashion-mnist:cnn_xlarge-natural",
          notes=("The 'teacher knows more' protocol, as in the papers and in practice: the teacher is ardir's "
                 "shipped fashion-mnist:cnn_xlarge-at (benchmarks/train_teacher.py: a 0.85 M-parameter CNN "
                 "adversarially trained on all 59,000 training images but a 1,000-image validation split, on "
                 "which its checkpoint was chosen); the students (cnn_small, 25 k parameters) see only the "
                 "suite's seeded 5,000-image subset. Its accuracies below are its manifest's (measured once by "
                 "train_teacher.py).",
                 "eps = 0.1, the usual L∞ radius for (Fashion-)MNIST. Training attack PGD-10 with step 0.025 = "
                 "2.5·eps/10 (Madry et al.'s rule). Evaluation PGD-20 and CW∞-30 with step eps/4 = 0.025 (the "
                 "CIFAR protocol's ratio, 2/255 at 8/255, scaled to eps).",
                 "Every method gets the same 10 epochs on the same 5,000 training images (seeded subset) and lr "
                 "(0.05, lr x0.1 at each method's paper fractions of the epochs); IAD's warm-up is 0.3 x epochs "
                 "as its paper's 60/200. ard runs at its reference settings (tau 30, KL / C), ard-tau1 at tau 1 "
                 "with the batch-mean KL. AdaAD and MTARD at their reference settings (AdaAD alpha 1, the KL / C "
                 "of its CIFAR-10 script; MTARD's adaptive weights, KL / C); MTARD's natural teacher is the "
                 "shipped fashion-mnist:cnn_xlarge-natural (the same network trained without attack on the same "
                 "59,000 images). evaluate()'s sanity checks are off: AutoAttack's black-box Square already "
                 "catches masked gradients.",
                 "Δ vs AT: the row's AutoAttack (where measured) and CW∞-30 accuracy minus AT's, paired by seed "
                 "(same data subset and order), mean ± std over the seeds.")),
    Suite(name="fashion-mnist-l2", dataset="fashion-mnist", results_name="fashion_mnist_l2", num_classes=10, in_chans=1,
          norm="l2", eps=1.5, step_size=0.375, steps=10, eval_step_size=0.375,
          teacher_model="cnn_xlarge", teacher_method="at", teacher_epochs=None,
          teacher_spec="fashion-mnist:cnn_xlarge-at",
          students=("cnn_small",), methods=("at", "ardir"), epochs=10, lr=0.05, batch_size=128,
          train_size=5000, attacks=("natural", "fgsm", "pgd20", "cw30"), eval_size=1000, aa_size=1000,
          seeds=(0,), checks=False,
          notes=("The L2 threat model, a mini-table: AT and ARDIR, one seed, otherwise the fashion-mnist suite's "
                 "protocol (the same 5,000 training images, 10 epochs, lr 0.05, the shipped teacher).",
                 "eps = 1.5 in L2 on 28x28 images in [0, 1]: the MNIST L2 radius of Schott et al. (ICLR 2019, "
                 "'Towards the first adversarially robust neural network model on MNIST'). For scale, the L-inf "
                 "suite's 0.1 on every pixel is an L2 length of 2.8. Training PGD-10 with step 2.5·eps/10 = "
                 "0.375 along the normalised gradient; evaluation FGM, PGD-20 and CW₂-30 (the CW margin loss "
                 "under L2 PGD) with step eps/4 = 0.375, on a fixed random 1,000 test images (seed 0).",
                 "The teacher is the shipped L-inf teacher (no L2 teacher is shipped): what it hands down was "
                 "learnt under another threat model. Its row is measured here, under L2, on the same 1,000 images.",
                 "Every row has AutoAttack's standard L2 version, the teacher's included (--no-teacher-eval skips "
                 "the teacher's, which costs about as much as the students' rows together on two CPU cores).")),
    Suite(name="fashion-mnist-same-data", dataset="fashion-mnist", results_name="fashion_mnist_same_data", num_classes=10, in_chans=1,
          eps=0.1, step_size=0.025, steps=10, eval_step_size=0.025,
          teacher_model="cnn_large", teacher_method="trades", teacher_epochs=10, teacher_spec=None,
          teacher_kwargs={"lr": 0.05},
          students=("cnn_small",), methods=ALL_METHODS, epochs=10, lr=0.05, batch_size=128, train_size=5000,
          attacks=("natural", "fgsm", "pgd20", "cw30"), eval_size=None, aa_size=1000, seeds=(0, 1, 2),
          checks=False, teacher_attacks=("natural", "fgsm", "pgd20"),
          notes=("The 'same data' protocol: the teacher is trained on the students' own 5,000 images for their 10 "
                 "epochs, so it knows no more than they do (kept for comparison; the fashion-mnist suite is the "
                 "one where the teacher knows more).",
                 "eps = 0.1, the usual L∞ radius for (Fashion-)MNIST. Training attack PGD-10 with step 0.025 = "
                 "2.5·eps/10 (Madry et al.'s rule: the steps together travel 2.5 eps, so a random start can still "
                 "reach any point of the ball). Evaluation PGD-20 and CW∞-30 with step eps/4 = 0.025: the CIFAR "
                 "protocol's ratio (2/255 at 8/255) scaled to eps; 20 steps travel 5 eps.",
                 "Teacher cnn_large (0.2 M parameters) trained once with TRADES (beta 6), shared by every row and "
                 "seed (as the papers share one teacher); students cnn_small (25 k parameters).",
                 "Every method gets the same 10 epochs on the same 5,000 training images (seeded subset) and lr "
                 "(0.05, lr x0.1 at each method's paper fractions of the epochs); IAD's warm-up is scaled like "
                 "its paper's 60/200: 0.3 x epochs. Sized so the whole suite (3 seeds) runs in under 2 hours on 2 "
                 "CPU cores (measured: 1 h 54 min with --workers 2).",
                 "The teacher's row: natural, FGSM and PGD-20 on the full test set (CW∞ and AutoAttack on the "
                 "teacher would cost as much as five student rows). evaluate()'s sanity checks are off (--no-checks "
                 "is implied): AutoAttack's black-box Square already catches masked gradients.")),
]}

ABLATIONS: Dict[str, Dict[str, Any]] = {
    "base: w_ce 0, features, nmse, w_ir 1, natural input, CE attack": {},
    "w_ir 0 (no IR term: ARD with tau 1)": {"w_ir": 0.0},
    "w_ir 0.3": {"w_ir": 0.3},
    "w_ir 3": {"w_ir": 3.0},
    "layers block3 (conv map, 1x1 adapter)": {"layers": ["block3"]},
    "layers block2 + block3 + features": {"layers": ["block2", "block3", "features"]},
    "distance mse": {"distance": "mse"},
    "teacher input adversarial": {"teacher_input": "adversarial"},
    "inner max KL to teacher": {"attack_loss": "kl"},
    "w_ce 1 (CE on x' added)": {"w_ce": 1.0},
    "w_ce 1, w_ir 0 (ARD with tau 1 + CE on x')": {"w_ce": 1.0, "w_ir": 0.0},
    "tau 4": {"tau": 4.0},
    "reference: AT, no teacher": {},
}
"""ARDIR variants of ``--ablation``: a label and the ARDIR arguments that differ from :data:`ABLATION_BASE`."""
ABLATION_BASE: Dict[str, Any] = {"w_ce": 0.0}
"""The configuration the one-factor ablation varies: ARDIR's first defaults (no CE term), written out so that the
rows keep their meaning when a library default changes."""
ABLATION_METHODS = {"reference: AT, no teacher": "at"}
"""Ablation rows that run another method than ARDIR: the bar a variant must clear on the same validation split."""


def ablation_arguments(variant: Optional[str]) -> Optional[Dict[str, Any]]:
    """The method arguments of an ablation row (None outside the ablation)."""
    if variant is None:
        return None
    return dict(ABLATIONS[variant]) if variant in ABLATION_METHODS else {**ABLATION_BASE, **ABLATIONS[variant]}
