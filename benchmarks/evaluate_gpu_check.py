"""GPU check of ardir.evaluate: CUDA end to end, both AutoAttack engines, masking flags, resume, timings.

    DATA_DIR=<Fashion-MNIST idx files> OUT=<folder> python benchmarks/evaluate_gpu_check.py

Trains a cnn_small with AT on Fashion-MNIST (EPOCHS, default 6), evaluates the first N (default 1000) test images
at eps = 0.1 with both AutoAttack engines (needs torchattacks and pyautoattack), compares ardir's PGD-20 with
torchattacks.PGD, checks the masking flags on a quantised model and the resumable state on the device.
Results of one run on an H200: benchmarks/results/evaluate_gpu.md.
"""
import os, time
import torch, torch.nn as nn
from torch.utils.data import DataLoader
import ardir, torchattacks, pyautoattack
from ardir.evaluate import evaluate
DEV = os.environ.get("DEV", "cuda")
OUT = os.environ.get("OUT", "/tmp/out")
print(torch.__version__, (torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"), torchattacks.__version__, pyautoattack.__version__, flush=True)
train = ardir.data.get_dataset("fashion-mnist", "train", data_dir=os.environ.get("DATA_DIR"), augment=False)
test = ardir.data.get_dataset("fashion-mnist", "test", data_dir=os.environ.get("DATA_DIR"))
torch.manual_seed(0)
model = ardir.models.create("cnn_small", in_chans=1).to(DEV)
t = time.time()
ardir.ATTrainer(model, DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)),
                epochs=int(os.environ.get("EPOCHS", 6)), eps=0.1, step_size=0.025, steps=10, lr=0.05, progress=False).fit()
print(f"train {time.time() - t:.1f}s", flush=True)
loader = DataLoader(test, batch_size=500)
model.train(); model.zero_grad(set_to_none=True)
modes = [m.training for m in model.modules()]
reports = {}
for engine in ("ardir", "official"):
    t = time.time()
    r = evaluate(model, loader, eps=0.1, engine=engine, eps_sweep=[0.05, 0.2], n_examples=int(os.environ.get("N", 1000)),
                 progress=False, dataset="fashion-mnist", warn=False)
    torch.cuda.synchronize() if DEV == "cuda" else None
    print(f"\n### engine={engine}: {time.time() - t:.1f}s, device {r.device}\n" + r.to_markdown(), flush=True)
    print("components", r.components["autoattack"], "sweep", r.sweep, flush=True)
    r.save(f"{OUT}/fmnist_{engine}")
    assert [m.training for m in model.modules()] == modes
    assert all(p.device.type == DEV and p.grad is None for p in model.parameters())
    assert r.device.startswith(DEV) and (DEV == "cpu" or not r.masking_suspected), r.flags
    reports[engine] = r
diff = abs(reports["ardir"].accuracy["autoattack"] - reports["official"].accuracy["autoattack"])
disagree = int((reports["ardir"].correct["autoattack"] != reports["official"].correct["autoattack"]).sum())
print(f"AA ardir {reports['ardir'].accuracy['autoattack']:.2f} official {reports['official'].accuracy['autoattack']:.2f} "
      f"diff {diff:.2f} points, {disagree} samples differ", flush=True)
# torchattacks PGD-20 on the same samples
atk = torchattacks.PGD(model.eval(), eps=0.1, alpha=0.025, steps=20, random_start=True)
c = n = 0
for x, y in loader:
    x, y = x[: 1000 - n].to(DEV), y[: 1000 - n].to(DEV)
    if not len(y): break
    c += (model(atk(x, y)).argmax(1) == y).sum().item(); n += len(y)
print(f"torchattacks PGD-20 {100 * c / n:.2f} vs ardir {reports['ardir'].accuracy['pgd20']:.2f}", flush=True)
# masked gradients on CUDA
class Quantize(nn.Module):
    def forward(self, x): return torch.round(x * 7) / 7
masked = nn.Sequential(Quantize(), model).eval()
r = evaluate(masked, loader, eps=0.1, attacks=("natural", "fgsm", "pgd20", "autoattack"), n_examples=500,
             progress=False, warn=False)
print("\n### masked\n" + r.to_markdown(), flush=True)
assert {"zero_gradients", "large_eps"} <= {f.code for f in r.flags}
# resume on CUDA: a finished state replays to the same numbers
state = f"{OUT}/state.json"
a = evaluate(model, loader, eps=0.1, attacks=("natural", "pgd20", "apgd-t"), n_examples=1000, progress=False, state_path=state)
b = evaluate(model, loader, eps=0.1, attacks=("natural", "pgd20", "apgd-t"), n_examples=1000, progress=False, state_path=state)
assert all(torch.equal(a.correct[k], b.correct[k]) for k in a.correct)
print("resume ok", a.seconds, b.seconds, os.path.getsize(state), flush=True)
print("ALL OK")
