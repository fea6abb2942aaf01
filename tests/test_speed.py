"""The fast path: precision, channels_last, compile, the device-resident loader, no host sync in the attack.

CUDA-only tests skip on a CPU machine; ``benchmarks/gpu_check.sh`` runs them on a GPU.
"""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ardir
from ardir.attacks import compile_for_attack
from ardir.gpu_data import GPULoader, crop_flip_batch
from conftest import TinyNet

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
ATTACK = dict(eps=0.1, step_size=0.03, steps=3)


def _loader(n=64, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=batch)


def _trainer(student, teacher=None, loader=None, **kwargs):
    teacher = teacher if teacher is not None else TinyNet(width=12).eval().requires_grad_(False)
    if not ardir.methods.METHODS[kwargs.get("method", "ardir")].needs_teacher:
        teacher = None
    return ardir.Trainer(student, loader or _loader(),
                         teacher=None if teacher is None else teacher.to(next(student.parameters()).device),
                         epochs=1, lr=0.05, progress=False, **ATTACK, **kwargs)


def test_defaults_are_the_safe_ones():
    trainer = _trainer(TinyNet())
    assert trainer.precision == "fp32" and trainer.scaler is None
    assert trainer.channels_last is True  # CUDA and CPU default (a layout: same arithmetic, faster convolutions)
    with pytest.raises(ValueError, match="precision"):
        _trainer(TinyNet(), precision="fp8")


def test_channels_last_gives_the_same_training():
    torch.manual_seed(0)
    a = TinyNet()
    b = TinyNet()
    b.load_state_dict(a.state_dict())
    teacher = TinyNet(width=12).eval().requires_grad_(False)
    torch.manual_seed(1)
    _trainer(a, teacher, channels_last=False).fit()
    torch.manual_seed(1)
    trainer = _trainer(b, teacher)  # default: channels_last
    trainer.fit()
    assert b.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_trains_every_method_step():
    for method in ("at", "trades", "ard", "rslad", "ardir"):
        record = _trainer(TinyNet(), method=method, precision="bf16").train_epoch()
        assert all(torch.isfinite(torch.tensor(v)) for k, v in record.items() if k != "epoch"), method


def test_pgd_under_autocast_keeps_fp32_images_in_the_ball():
    model = TinyNet().eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = ardir.PGD(model, eps=0.1, step_size=0.03, steps=3)(x, y)
    assert adv.dtype == torch.float32 and (adv - x).abs().max() <= 0.1 + 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_compiled_attack_matches_eager_and_hooks_still_work():
    torch._dynamo.reset()
    model = TinyNet().eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,))
    pgd = ardir.PGD(model, eps=0.1, step_size=0.03, steps=3, random_start="none")
    eager = pgd(x, y)
    compile_for_attack(model, backend="eager")  # dynamo without inductor: fast, no C++ compiler needed
    try:
        torch.testing.assert_close(pgd(x, y), eager)
        # ARDIR's feature hooks on the student (the eager module) still fire while the attack runs compiled
        trainer = _trainer(model)
        record = trainer.train_epoch()
        assert record["ir"] > 0
    finally:
        compile_for_attack(model, enable=False)


def test_gpu_loader_batches_shards_and_epochs():
    images = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(40)
    loader = GPULoader(images, labels, batch_size=8, device="cpu", crop_padding=1, hflip=True, seed=3,
                       rank=0, world_size=1)
    assert len(loader) == 5
    first = [(x.clone(), y.clone()) for x, y in loader]
    again = [(x.clone(), y.clone()) for x, y in loader]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))  # seeded
    assert sorted(torch.cat([y for _, y in first]).tolist()) == list(range(40))  # a permutation
    assert all(x.dtype == torch.float32 and x.shape == (8, 1, 6, 6) and 0 <= x.min() and x.max() <= 1
               for x, _ in first)
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], first[0][1])  # a new shuffle each epoch
    # two shards of batch 4 cover each global batch of 8 of the one-process loader with batch 8
    loader.set_epoch(0)
    shards = [GPULoader(images, labels, batch_size=4, device="cpu", seed=3, rank=r, world_size=2) for r in (0, 1)]
    for (_, y), (_, y0), (_, y1) in zip(first, *shards):
        assert sorted(y.tolist()) == sorted(y0.tolist() + y1.tolist())


def test_crop_flip_batch_moves_and_flips_content():
    x = torch.arange(16.).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = crop_flip_batch(x, padding=1, hflip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert (out == x).all((1, 2, 3)).any() and not (out == x).all((1, 2, 3)).all()
    unpadded = crop_flip_batch(x, padding=0, hflip=True, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(u, x[0]) or torch.equal(u, x[0].flip(-1)) for u in unpadded)


def test_gpu_loader_from_an_ardir_loader_trains():
    loaders = ardir.data.get_loaders("fashion-mnist", fake_data=True, batch_size=32, val_size=0, limit=64)
    loader = GPULoader.from_loader(loaders.train, device="cpu")
    assert (loader.crop_padding, loader.hflip, len(loader)) == (2, True, 2)
    student = ardir.models.create("cnn_small", in_chans=1, width=4)
    teacher = ardir.models.create("cnn_small", in_chans=1, width=8).eval().requires_grad_(False)
    record = ardir.Trainer(student, loader, teacher=teacher, epochs=1, progress=False, **ATTACK).train_epoch()
    assert record["images_per_s"] > 0


@pytest.mark.slow  # bf16 is emulated on most CPUs: minutes there, seconds on a GPU (gpu_check.sh runs it)
def test_bf16_robust_accuracy_within_noise_of_fp32():
    """One seed, fp32 vs bf16, against the seed-to-seed spread of fp32 (test_trainer's robustness problem)."""
    from test_trainer import EPS, pgd_accuracy, robustness_problem
    x, y = robustness_problem(1024, 0)
    xt, yt = robustness_problem(512, 1)
    test = DataLoader(TensorDataset(xt.to(DEVICE), yt.to(DEVICE)), batch_size=256)

    def robust(precision, seed):
        torch.manual_seed(seed)
        model = TinyNet(width=8).to(DEVICE)
        train = DataLoader(TensorDataset(x.to(DEVICE), y.to(DEVICE)), batch_size=64, shuffle=True,
                           generator=torch.Generator().manual_seed(seed))
        ardir.ATTrainer(model, train, epochs=5, lr=0.05, progress=False, precision=precision,
                        eps=EPS, step_size=0.03, steps=5).fit()
        return pgd_accuracy(model, test)

    fp32, fp32_other_seed, bf16 = robust("fp32", 1), robust("fp32", 2), robust("bf16", 1)
    noise = abs(fp32 - fp32_other_seed)
    print(f"PGD-20 accuracy: fp32 {fp32:.1f} %, fp32 (other seed) {fp32_other_seed:.1f} %, bf16 {bf16:.1f} %")
    assert abs(bf16 - fp32) <= max(4.0, 2 * noise)


@needs_cuda
def test_no_host_sync_inside_the_attack_loop():
    """L-inf and L2 (every loss, both random starts): no step of the loop waits for the host."""
    model = TinyNet().cuda().eval()
    x, y = torch.rand(8, 1, 8, 8, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
    attacks = [ardir.PGD(model, eps=0.1, step_size=0.03, steps=3, loss=loss) for loss in ("ce", "kl", "cw")]
    attacks += [ardir.PGD(model, eps=0.5, step_size=0.2, steps=3, loss=loss, random_start=start, norm="l2")
                for loss in ("ce", "kl", "cw") for start in ("uniform", "normal")]
    for pgd in attacks:  # warm-up: the first call's pixel-range check (one sync), cuDNN autotuning, allocator
        pgd(x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for pgd in attacks:
            pgd(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_precisions_and_channels_last_default(precision):
    student = TinyNet().cuda()
    trainer = _trainer(student, precision=precision)
    assert trainer.channels_last is True and (trainer.scaler is not None) == (precision == "fp16")
    record = trainer.train_epoch()
    assert torch.isfinite(torch.tensor(record["loss"])) and record["peak_memory_mb"] > 0


@needs_cuda
def test_cuda_compile_trains():
    torch._dynamo.reset()
    trainer = _trainer(TinyNet().cuda(), compile=True, precision="bf16")
    try:
        record = trainer.train_epoch()
        assert torch.isfinite(torch.tensor(record["loss"])) and record["ir"] > 0
    finally:
        compile_for_attack(trainer.student, enable=False)


@needs_cuda
def test_no_memory_growth_across_epochs():
    images = torch.randint(0, 256, (512, 1, 8, 8), dtype=torch.uint8)
    loader = GPULoader(images, torch.randint(0, 4, (512,)), batch_size=64, device="cuda")
    trainer = _trainer(TinyNet().cuda(), loader=loader, precision="bf16")
    trainer.epochs = 3
    peaks = [r["peak_memory_mb"] for r in trainer.fit()]
    assert abs(peaks[2] - peaks[0]) <= 0.05 * peaks[0], peaks


@pytest.fixture
def bench():
    """benchmarks/throughput.py as a module."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_runs_and_writes_its_row(bench, tmp_path, capsys):
    """benchmarks/throughput.py end to end on a tiny setting (the lead's GPU run must not be its first run)."""
    results = tmp_path / "throughput.md"
    bench.main(["--device", "cpu", "--batch-size", "4", "--steps", "1", "--repeats", "1", "--results", str(results),
                "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("speedup_vs_reference=") and float(out[-1].split("=")[1]) > 0
    rows = [line for line in results.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and "cnn_large -> cnn_small" in rows[0] and "`python " in rows[0]
    bench.main(["--device", "cpu", "--batch-size", "4", "--epochs-check", "2", "--epoch-images", "8"])
    assert "peak memory epoch 1 -> 2" in capsys.readouterr().out


def test_throughput_compile_mode_reaches_torch_compile(bench, monkeypatch):
    """--compile-mode (a candidate for the GPU check) is passed to torch.compile of the attack's forward passes."""
    calls = []
    monkeypatch.setattr(bench, "compile_for_attack", lambda model, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(bench.ardir, "Trainer", lambda *a, **k: calls.append(k["compile"]) or
                        type("T", (), {"student": a[0]})())
    args = type("Args", (), dict(pair="fmnist", step_size=None, method="ardir", precision="fp32",
                                 channels_last=None, compile=True, compile_mode="reduce-overhead"))()
    bench.make_trainer(args, torch.device("cpu"), TinyNet(), TinyNet(), [])
    assert calls == [True, {"mode": "reduce-overhead"}]


@pytest.mark.parametrize("cudnn_tf32", [True, False])
def test_fp32_matmul_peak_on_cuda_is_timed_as_the_convolutions_run(bench, monkeypatch, cudnn_tf32):
    """The fp32 peak on CUDA uses TF32 matmuls exactly when cuDNN's convolutions do, and restores the setting."""
    seen = []
    monkeypatch.setattr(bench, "_timed_matmul", lambda *a: seen.append(torch.get_float32_matmul_precision()) or 1.0)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", cudnn_tf32)
    before = torch.get_float32_matmul_precision()
    bench.matmul_peak(torch.device("cuda"), torch.float32)
    bench.matmul_peak(torch.device("cuda"), torch.bfloat16)
    bench.matmul_peak(torch.device("cpu"), torch.float32)
    assert seen == [("high" if cudnn_tf32 else before), before, before]
    assert torch.get_float32_matmul_precision() == before


def test_rows_always_land_in_a_table(bench, tmp_path):
    """A row appended after prose starts a new table instead of becoming a stray line of text."""
    r = dict(device="cpu", method="ardir", pair="a -> b", batch=8, precision="fp32", channels_last=True, compile=False,
             loader="GPULoader", reference_images_per_s=1.0, ardir_images_per_s=2.0, speedup=2.0, gflop_per_image=0.1,
             achieved_tflops=0.2, fraction_of_peak=0.5, peak_memory_mb_ardir=1, peak_memory_mb_reference=1,
             epoch_seconds_50k=1.0, commit="abc", command="python x")
    path = tmp_path / "t.md"
    bench.write_row(path, r)
    bench.write_row(path, r)
    lines = path.read_text().splitlines()
    assert lines.count(bench.HEADER.splitlines()[0]) == 1 and lines[-1].startswith("| 20") and lines[-2].startswith("| 20")
    path.write_text(path.read_text() + "\nSummary of that run.")
    bench.write_row(path, r)
    lines = path.read_text().splitlines()
    assert lines[-5:-1] == ["Summary of that run.", "", *bench.HEADER.splitlines()] and lines[-1].startswith("| 20")


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["--repeats", "0"], "argument --repeats: 0 must be >= 1"),
    (["--steps", "two"], "argument --steps: expected a whole number"),
    (["--step-size", "-0.1"], "argument --step-size: -0.1 must be a positive number"),
    (["--channels-last", "flase"], "argument --channels-last: expected true or false, got 'flase'"),
    (["--epochs-check", "2", "--epoch-images", "64"], "--epoch-images 64 is smaller than --batch-size 128"),
])
def test_throughput_bad_flags_are_usage_errors(bench, capsys, flags, words):
    with pytest.raises(SystemExit) as info:
        bench.main(flags)
    assert info.value.code == 2 and words in capsys.readouterr().err
