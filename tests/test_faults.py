"""Fault injection across the three tasks (classification, segmentation, MIL): every fault class the zoo
guards against, in every split or stage where it applies. For each, the error names the file or key, and
the metrics and files already written are unchanged.

Faults: corrupt / truncated / zero-byte / wrong-mode / high-bit-depth files, bad labels, non-finite values,
concurrent runs into one folder, a full disk and a read-only folder (a small tmpfs where this process may
mount one, else a write patched to fail with ENOSPC / EROFS), SIGKILL / SIGTERM / SIGINT."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, compose

SPLITS = ("train", "val", "test")
FILE_FAULTS = ("corrupt", "truncated", "zero-byte")
QUIET = ["callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null", "logger=none",
         "callbacks.lr_monitor=null", "+trainer.num_sanity_val_steps=0", "data.num_workers=0"]
# 2 epochs x 3 steps of 4 items, on the embedded data of each task
RUNS = {
    "classification": ["model=halonet_tiny", "data=digits"],
    "segmentation": ["model=msguided_tiny", "data=shapes", "data.img_size=32"],
    "mil": ["model=abmil", "data=digit_bags"],
}
SHORT = ["data.batch_size=4", "trainer.max_epochs=2", "+trainer.limit_train_batches=3",
         "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", *QUIET]


def _inject(path: Path, fault: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"corrupt": b"\x89PNG not really" + bytes(range(64)), "truncated": data[: len(data) // 3],
                      "zero-byte": b""}[fault])


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (to assert nothing already written changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and ".hydra" not in p.parts and not p.name.endswith(".log") and p.name != ".zoo-run.lock"}


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


# ============================================================ image files, each split, each image task
def _imagefolder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in SPLITS:
        for c in ("a", "b"):
            for i in range(3):
                _png(root / split / c / f"{c}{i}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    return root


def _segfolder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in SPLITS:
        for i in range(3):
            _png(root / split / "images" / f"{i}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
            _png(root / split / "masks" / f"{i}.png", (np.arange(64).reshape(8, 8) % 2).astype(np.uint8))
    return root


def _image_dm(task: str, root: Path, **kw):
    from zoo.data import ClassificationDataModule, SegmentationDataModule

    common = dict(root=str(root), img_size=8, batch_size=1, in_chans=1, mean=[0.5], std=[0.5], num_workers=0, **kw)
    if task == "classification":
        dm = ClassificationDataModule(dataset="imagefolder", augment=False, **common)
    else:
        dm = SegmentationDataModule(dataset="segfolder", num_classes=2, **common)
    dm.setup("fit")
    return dm


def _loader(dm, split: str):
    return {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()


def _bad_file(task: str, root: Path, split: str, which: str = "image") -> Path:
    if task == "classification":
        return root / split / "b" / "b1.png"
    return root / split / ("masks" if which == "mask" else "images") / "1.png"


@pytest.mark.parametrize("task,which", [("classification", "image"), ("segmentation", "image"), ("segmentation", "mask")])
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("fault", FILE_FAULTS)
def test_unreadable_file_in_each_split(task, which, split, fault, tmp_path, caplog):
    """val/test: an error naming the file by default, left out (never replaced) with bad_images=skip;
    train: skipped and counted in the log by default, an error with bad_images=error."""
    from zoo.errors import DataFormatError

    root = (_imagefolder if task == "classification" else _segfolder)(tmp_path / "data")
    bad = _bad_file(task, root, split, which)
    n = sum(len(b[1]) for b in _loader(_image_dm(task, root), split))  # items per pass, before the fault
    _inject(bad, fault)
    if split == "train":
        with caplog.at_level("WARNING", logger="zoo.data"):
            batches = list(_loader(_image_dm(task, root), split))
        assert sum(len(b[1]) for b in batches) == n and bad.name in caplog.text and "skipped" in caplog.text
        with pytest.raises(DataFormatError, match=bad.name):
            list(_loader(_image_dm(task, root, bad_images="error"), split))
        return
    with pytest.raises(DataFormatError) as e:
        list(_loader(_image_dm(task, root), split))
    assert str(bad) in str(e.value) and "data.bad_images=skip" in str(e.value)
    dm = _image_dm(task, root, bad_images="skip")
    ds = dm.val_set if split == "val" else dm.test_set
    image_of_bad = bad if which == "image" else _bad_file(task, root, split, "image")
    assert ds.left_out == [str(image_of_bad)] and len(ds) == n - 1
    assert str(image_of_bad) not in ds.item_names(range(len(ds)))
    assert sum(len(b[1]) for b in _loader(dm, split)) == n - 1  # the others scored, none twice


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("split", SPLITS)
def test_wrong_mode_and_high_bit_depth_images_read_by_their_values(task, split, tmp_path):
    """RGBA, palette, CMYK and 16-bit files are read as the values they hold (scaled by range), never
    clipped; a float image with NaN is unreadable (an error naming it: by default in val/test, with
    bad_images=error in train)."""
    from zoo.errors import DataFormatError

    root = (_imagefolder if task == "classification" else _segfolder)(tmp_path / "data")
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    target = _bad_file(task, root, split)
    modes = {
        "RGBA": Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 7)], -1), "RGBA"),
        "P": Image.fromarray(grey).convert("P"),
        "CMYK": Image.fromarray(np.stack([grey] * 3, -1)).convert("CMYK"),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),  # 16-bit: the same grey at 16 bits
    }

    def dataset(**kw):
        dm = _image_dm(task, root, **kw)
        return {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}[split]

    def read(im: Image.Image, suffix: str = ".png") -> torch.Tensor:
        path = target.with_suffix(suffix)
        for old in target.parent.glob(f"{target.stem}.*"):
            old.unlink()
        im.save(path)
        ds = dataset()
        torch.manual_seed(0)  # the same draw of any training augmentation for every file
        return ds[ds.item_names(range(len(ds))).index(str(path))][0]

    reference = read(Image.fromarray(grey))  # the same grey as a plain 8-bit file, through the same transform
    for mode, im in modes.items():
        x = read(im, ".tif" if mode == "CMYK" else ".png")
        torch.testing.assert_close(x, reference, atol=2 / 255 / 0.5, rtol=0, msg=mode)
    for old in target.parent.glob(f"{target.stem}.*"):
        old.unlink()
    nan = grey.astype(np.float32) / 255
    nan[2, 3] = np.nan
    Image.fromarray(nan, "F").save(target.with_suffix(".tif"))
    ds = dataset(**({"bad_images": "error"} if split == "train" else {}))
    with pytest.raises(DataFormatError) as e:
        [ds[i] for i in range(len(ds))]
    assert str(target.with_suffix(".tif")) in str(e.value) and "non-finite" in str(e.value)


# ============================================================ feature bags, each split
def _featurebags(root: Path, n: int = 9, dim: int = 4) -> list[str]:
    (root / "pt_files").mkdir(parents=True, exist_ok=True)
    ids = [f"b{i}" for i in range(n)]
    splits = ["train"] * 3 + ["val"] * 3 + ["test"] * 3
    for i, b in enumerate(ids):
        torch.save(torch.randn(3, dim, generator=torch.Generator().manual_seed(i)), root / "pt_files" / f"{b}.pt")
    (root / "labels.csv").write_text("bag_id,label,split\n" + "".join(
        f"{b},{i % 2},{s}\n" for i, (b, s) in enumerate(zip(ids, splits))))
    return ids


def _bags_dm(root: Path):
    from zoo.data import MILDataModule

    dm = MILDataModule(dataset="featurebags", root=str(root), num_workers=0, batch_size=2)
    dm.setup()
    return dm


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("fault", [*FILE_FAULTS, "nan", "inf", "wrong-dim", "1-d"])
def test_bad_bag_in_each_split_names_the_bag(split, fault, tmp_path):
    from zoo.errors import DataFormatError

    root = tmp_path / "bags"
    ids = _featurebags(root)
    bag = ids[{"train": 0, "val": 4, "test": 8}[split]]  # the first bag of train: the odd one still named
    path = root / "pt_files" / f"{bag}.pt"
    x = torch.load(path, weights_only=True)
    if fault in FILE_FAULTS:
        _inject(path, fault)
    elif fault in ("nan", "inf"):
        x[1, 2] = float(fault)
        torch.save(x, path)
    elif fault == "wrong-dim":
        torch.save(torch.randn(3, 6), path)
    else:
        torch.save(torch.randn(5), path)
    with pytest.raises(DataFormatError) as e:
        dm = _bags_dm(root)
        list(_loader(dm, split))
    msg = str(e.value)
    assert str(path) in msg or repr(bag) in msg, msg
    others = [b for b in ids if b != bag]
    assert not any(f"{b}.pt" in msg or f"'{b}'" in msg for b in others), msg  # never a correct bag
    if fault == "wrong-dim":
        assert "feature size 6" in msg and "have 4" in msg


# ============================================================ bad labels, each task
def test_bad_labels_in_each_task(tmp_path):
    """A class folder without images, a mask value past the class count, a bag label outside the declared
    classes: errors naming the folder, the mask file, the CSV row."""
    from zoo.errors import DataFormatError

    root = _imagefolder(tmp_path / "cls")
    (root / "train" / "c").mkdir()
    with pytest.raises(DataFormatError, match=str(root / "train" / "c")):
        _image_dm("classification", root)

    root = _segfolder(tmp_path / "seg")
    mask = _png(root / "val" / "masks" / "2.png", np.full((8, 8), 5, np.uint8))
    with pytest.raises(DataFormatError, match=r"mask .*2.png has values \[5\]"):
        list(_image_dm("segmentation", root).val_dataloader())

    root = tmp_path / "bags"
    _featurebags(root)
    csv = root / "labels.csv"
    csv.write_text(csv.read_text().replace("b5,1,val", "b5,tumor,val"))
    with pytest.raises(DataFormatError, match=r"labels.csv.*(row|line) 7"):
        from zoo.data import MILDataModule

        MILDataModule(dataset="featurebags", root=str(root), num_workers=0, num_classes=2).setup()


# ============================================================ non-finite outputs in evaluation
def _nan_checkpoint(tmp_path: Path, task: str) -> Path:
    """A trained-looking checkpoint of each task's tiny net whose weights hold a NaN."""
    import zoo

    name, kwargs, classes = {"classification": ("halonet_tiny", {}, 10), "segmentation": ("msguided_tiny", {}, 4),
                             "mil": ("abmil", {"in_chans": 1}, 2)}[task]
    net = zoo.create_model(name, num_classes=classes, **kwargs)
    sd = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = tmp_path / f"{task}.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in sd.items()},
                "hyper_parameters": {"model": {"name": name, "kwargs": kwargs}, "num_classes": classes,
                                     "data_info": {}}}, path)
    return path


@pytest.mark.parametrize("task", list(RUNS))
def test_non_finite_evaluation_stops_naming_the_items_and_keeps_metrics(task, compose_cfg, tmp_path):
    from evaluate import evaluate
    from zoo.errors import NonFiniteError

    ckpt = _nan_checkpoint(tmp_path, task)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"test/acc": 0.5}\n')  # an earlier evaluation's
    before = snapshot(run)
    data = RUNS[task][1]
    with pytest.raises(NonFiniteError, match=r"test loss is nan at test batch 0: non-finite \(NaN/inf\) outputs for test item 0"):
        evaluate(compose_cfg("evaluate", [f"ckpt_path={ckpt}", data, "trainer=debug", *QUIET[:2]], out_dir=run))
    assert snapshot(run) == before


def test_non_finite_evaluation_names_the_files(tmp_path, compose_cfg):
    """With a folder dataset the error names the image files of the batch."""
    from evaluate import evaluate
    from zoo.errors import NonFiniteError

    root = tmp_path / "data"
    for split in SPLITS:
        for c in [str(i) for i in range(10)]:
            _png(root / split / c / f"{c}.png", np.full((32, 32, 3), 9 * int(c), np.uint8))
    ckpt = _nan_checkpoint(tmp_path, "classification")
    with pytest.raises(NonFiniteError) as e:
        evaluate(compose_cfg("evaluate", [f"ckpt_path={ckpt}", "data=imagefolder", f"data.root={root}",
                                          "data.img_size=32", "data.batch_size=2", "trainer=debug", *QUIET[:2]]))
    assert str(root / "test" / "0" / "0.png") in str(e.value)


# ============================================================ concurrent runs
def _hold(run: Path) -> subprocess.Popen:
    """Another process holding ``run`` (as a training run there does), until killed."""
    code = ("import sys, time\nfrom zoo.runlock import run_dir_lock\n"
            f"with run_dir_lock({str(run)!r}):\n    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("task", list(RUNS))
def test_second_run_into_a_folder_in_use_stops_naming_it_and_its_process(task, tmp_path):
    from train import train
    from zoo.runlock import RunDirInUseError

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("from: the first run\n")
    (run / "metrics.json").write_text('{"test/acc": 0.9}\n')
    before = snapshot(run)
    holder = _hold(run)
    try:
        with pytest.raises(RunDirInUseError) as e:
            train(compose("train", [*RUNS[task], *SHORT], run))
        assert str(run) in str(e.value) and f"process {holder.pid}" in str(e.value)
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_cli_second_run_exits_2_before_hydra_writes_and_a_killed_holder_does_not_block_resume(tmp_path):
    from train import train

    run = tmp_path / "run"
    train(compose("train", [*RUNS["classification"], *SHORT, "trainer.max_epochs=1"], run))
    before = snapshot(run)
    holder = _hold(run)
    try:
        proc = subprocess.run([sys.executable, "train.py", *RUNS["classification"], *SHORT, f"hydra.run.dir={run}",
                               "ckpt_path=last"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"run directory {run} is in use by process {holder.pid}" in proc.stderr
        assert not (run / ".hydra").exists() and snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its file stays, its lock goes
        holder.wait()
    assert (run / ".zoo-run.lock").exists()
    metrics = train(compose("train", [*RUNS["classification"], *SHORT, "ckpt_path=last"], run))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1 and "test/acc" in metrics


# ============================================================ a full disk, a read-only folder
def _mount_tmpfs(where: Path, size_mb: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """One finished 1-epoch run per task (checkpoints, config.yaml, metrics.json), to copy and fault."""
    from train import train

    runs = {}
    for task, model in RUNS.items():
        run = tmp_path_factory.mktemp(task)
        train(compose("train", [*model, *SHORT, "trainer.max_epochs=1"], run))
        runs[task] = run
    return runs


@pytest.fixture
def faulty_folder(tmp_path, monkeypatch):
    """``make(fault, src)`` -> a copy of run ``src`` in a folder where writing a checkpoint fails as
    ``fault`` ('full' / 'read-only') does: a real tmpfs (filled up, or remounted read-only) where this
    process may mount one, else ``torch.save`` patched to fail with ENOSPC / EROFS after the copy."""
    mounted: list[Path] = []

    def make(fault: str, src: Path) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        need = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) // 2**20 + 4
        real = _mount_tmpfs(where, need * 2)
        if real:
            mounted.append(where)
        run = where / "run"
        shutil.copytree(src, run)
        if real and fault == "full":
            with open(where / "filler", "wb") as f:  # leave too little room for another checkpoint
                try:
                    while True:
                        f.write(b"\0" * 2**20)
                except OSError:
                    pass
        elif real:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        else:
            code = errno.ENOSPC if fault == "full" else errno.EROFS
            real_save = torch.save

            def failing(obj, f, *a, **k):
                real_save(obj, f, *a, **k)
                raise OSError(code, os.strerror(code))

            monkeypatch.setattr(torch, "save", failing)
        return run

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.parametrize("task", list(RUNS))
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_checkpoint_write_into_full_or_read_only_folder(task, fault, finished_runs, faulty_folder):
    """Resuming into a folder that cannot take the next checkpoint: an error naming last.ckpt and the
    cause, every file already there unchanged, no temporary file left."""
    from train import train
    from zoo.errors import ZooError

    run = faulty_folder(fault, finished_runs[task])
    before = snapshot(run)
    with pytest.raises(ZooError) as e:
        train(compose("train", [*RUNS[task], *SHORT, "ckpt_path=last"], run))
    msg = str(e.value)
    assert str(run) in msg
    assert ("disk is full" in msg) if fault == "full" else ("read-only" in msg or "not writable" in msg), msg
    after = snapshot(run)
    after.pop("config.yaml"), before.pop("config.yaml")  # the resumed run's own (written before the checkpoint)
    assert after == before and no_temp_files(run)


def test_read_only_run_folder_on_the_command_line_exits_2_naming_it(tmp_path):
    ro = tmp_path / "ro"
    if _mount_tmpfs(ro, 1):
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    elif os.geteuid() != 0:
        ro.chmod(0o555)
    else:
        pytest.skip("root without mount: no way to make a read-only folder here (the in-process test covers it)")
    try:
        proc = subprocess.run([sys.executable, "train.py", *RUNS["mil"], *SHORT, f"hydra.run.dir={ro / 'run'}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
        ro.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(ro / "run") in proc.stderr and "Traceback" not in proc.stderr


# ============================================================ signals
@pytest.fixture
def restore_sigint():
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after catching one


@pytest.mark.parametrize("task", list(RUNS))
@pytest.mark.parametrize("sig,code", [("INT", 128 + signal.SIGINT), ("TERM", 128 + signal.SIGTERM)])
def test_sigint_and_sigterm_save_last_ckpt_and_exit_with_the_documented_code(task, sig, code, tmp_path, restore_sigint):
    from train import run_guarded, train

    sys.path.insert(0, str(ROOT / "tests"))
    run = tmp_path / "run"
    kill = ["+callbacks.kill._target_=interrupt_helpers.SignalAt", "+callbacks.kill.step=4", f"+callbacks.kill.signal={sig}"]
    with pytest.raises(SystemExit) as e:
        run_guarded(train, compose("train", [*RUNS[task], *SHORT, *kill], run))
    assert e.value.code == code
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and not (run / "metrics.json").exists() and no_temp_files(run)


@pytest.mark.parametrize("task", ["segmentation", "mil"])  # classification: tests/test_reliability.py
def test_sigkill_keeps_the_last_epoch_checkpoint_and_resumes(task, tmp_path):
    from train import train

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", *RUNS[task], *SHORT, f"hydra.run.dir={run}",
         "+callbacks.kill._target_=interrupt_helpers.SignalAt", "+callbacks.kill.step=4", "+callbacks.kill.signal=KILL"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (run / "metrics.json").exists() and no_temp_files(run)
    metrics = train(compose("train", [*RUNS[task], *SHORT, "ckpt_path=last"], run))  # the dead run's lock: no block
    assert metrics and set(json.loads((run / "metrics.json").read_text())) == set(metrics)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


# ============================================================ input checks before the forward pass
IMAGE_NETS = ["halonet_tiny", "biformer_nano", "dcal_deit_nano", "dependencyvit_nano", "promptcam_vit_nano",
              "sparsifiner_deit_nano", "ulsam_mobilenetv2_tiny", "vit_nano", "fpn_tiny", "msguided_tiny",
              "biformer_fpn_nano"]  # one net per family: the check is create_model's, before any layer runs


@pytest.mark.parametrize("name", IMAGE_NETS)
def test_wrong_input_shape_is_named_before_the_forward_pass(name):
    import zoo
    from zoo.errors import InputSizeError

    net = zoo.create_model(name).eval()
    c, h, w = net.zoo_spec.input_size
    with pytest.raises(InputSizeError, match=rf"takes a batch of images \[B, {c}, H, W\]; got a 3-d tensor .*unsqueeze\(0\)"):
        net(torch.randn(c, h, w))
    with pytest.raises(InputSizeError, match=rf"built for {c}-channel images \[B, {c}, H, W\]; got \[1, {c + 1}, {h}, {w}\]"):
        net(torch.randn(1, c + 1, h, w))
    grey = zoo.create_model(name, in_chans=1).eval()  # built for grey images: grey images pass
    with torch.no_grad():
        out = grey(torch.randn(1, 1, h, w))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,kwargs,shape,expected", [
    ("abmil", {"in_dim": 16}, (1, 5, 8), r"\[B, N, 16\] feature bags; got \[1, 5, 8\]"),
    ("abmil", {"in_dim": 16}, (5, 16), r"\[B, N, 16\] feature bags; got \[5, 16\] \(one bag: x.unsqueeze\(0\)\)"),
    ("acmil", {}, (1, 5, 16), r"\[B, N, 1, H, W\] image bags; got \[1, 5, 16\]; feature bags need a net built with in_dim"),
    ("acmil", {}, (5, 1, 28, 28), r"image bags; got \[5, 1, 28, 28\] \(one bag"),
])
def test_wrong_bag_shape_names_the_expected_shape(name, kwargs, shape, expected):
    import zoo
    from zoo.errors import InputSizeError

    net = zoo.create_model(name, **kwargs).eval()
    with pytest.raises(InputSizeError, match=expected):
        net(torch.randn(*shape))


@pytest.mark.parametrize("name,size,patch,fit", [("vit_nano", 30, 4, 28), ("promptcam_vit_nano", 34, 4, 32),
                                                 ("sparsifiner_deit_nano", 30, 4, 28), ("promptcam_vit_small", 230, 16, 224)])
def test_patch_size_that_does_not_divide_img_size_is_refused_at_build(name, size, patch, fit):
    import zoo
    from zoo.errors import ModelArgumentError

    with pytest.raises(ModelArgumentError, match=rf"img_size={size} is not a multiple of the patch size {patch}.*img_size={fit}"):
        zoo.create_model(name, img_size=size)
    assert zoo.create_model(name, img_size=fit).zoo_spec.input_size[-1] == fit


def test_prompt_cam_without_classes_is_timm_features_and_refuses_trait_maps():
    """A documented choice instead of a refusal: num_classes=0 is timm's 'no classifier', the pooled
    backbone feature [B, D]; what needs the class prompts says so."""
    import zoo

    net = zoo.create_model("promptcam_vit_nano", num_classes=0).eval()
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, net.num_features)
    with pytest.raises(ValueError, match="need the class prompts and the head"):
        net.prompt_attention(torch.randn(1, 3, 32, 32))
