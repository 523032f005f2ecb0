"""Re-ID data: the four readers on tiny fixtures in their published layouts, the P x K sampler, the
held-out val identities, the embedded digit_reid demo, and the batch contract of the loaders."""
from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.data import DATAMODULES, ReIDDataModule
from zoo.data.reid import IdentitySampler, as_hw
from zoo.data.reid_datasets import READERS, digit_reid_records, render_digit_reid
from zoo.errors import DataFormatError, DatasetNotFoundError

HW = (16, 8)  # tiny (H, W) for loader tests


def _jpg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 6, 3), dtype=np.uint8)).save(path, "JPEG")


# ------------------------------------------------------------------ fixture writers
# Each returns (root to pass, expected dict): train/query/gallery as sorted (pid, camid) lists.
TRAIN_IDS = {2: [(1, 3), (2, 2)], 7: [(1, 2), (3, 2)], 10: [(2, 1), (4, 1)], 11: [(1, 4)],
             15: [(3, 2), (5, 2)], 23: [(2, 3), (6, 1)]}  # pid -> [(1-based camera, count)]
QUERY = [(1, 1), (1, 2), (3, 1)]
GALLERY = [(1, 3), (1, 1), (3, 2), (3, 4)]


def _expected(train_ids=TRAIN_IDS):
    train = sorted((p, c - 1) for p, cams in train_ids.items() for c, n in cams for _ in range(n))
    return dict(train=train, query=sorted((p, c - 1) for p, c in QUERY),
                gallery=sorted([(p, c - 1) for p, c in GALLERY] + [(0, 0), (0, 1)]))


def write_market(tmp: Path, duke: bool = False):
    base = tmp / ("DukeMTMC-reID" if duke else "Market-1501-v15.09.15")
    k = 0

    def name(pid, cam, i):
        nonlocal k
        k += 1
        tail = f"_f{k:07d}" if duke else f"s1_{k:06d}_0{i % 10}"
        return (f"{pid:04d}" if pid >= 0 else "-1") + f"_c{cam}{tail}.jpg"

    for pid, cams in TRAIN_IDS.items():
        for cam, n in cams:
            for i in range(n):
                _jpg(base / "bounding_box_train" / name(pid, cam, i), k)
    _jpg(base / "bounding_box_train" / name(-1, 1, 0))  # junk: dropped
    _jpg(base / "bounding_box_train" / name(0, 2, 0))  # a distractor in train: not an identity, dropped
    for pid, cam in QUERY:
        _jpg(base / "query" / name(pid, cam, 0), k)
    _jpg(base / "query" / name(-1, 2, 0))
    for pid, cam in GALLERY:
        _jpg(base / "bounding_box_test" / name(pid, cam, 0), k)
    for cam in (1, 2):  # distractors stay in the gallery; junk goes
        _jpg(base / "bounding_box_test" / name(0, cam, 0), k)
        _jpg(base / "bounding_box_test" / name(-1, cam, 0), k)
    return tmp, _expected()


def write_duke(tmp: Path):
    return write_market(tmp, duke=True)


def write_msmt(tmp: Path):
    base = tmp / "MSMT17_V1"
    lines = {"train": [], "val": [], "query": [], "gallery": []}
    k = 0

    def add(split, folder, pid, cam, listed_pid):
        nonlocal k
        k += 1
        rel = f"{pid:04d}/{pid:04d}_{k:03d}_{cam:02d}_0303morning_{k:04d}_0.jpg"
        _jpg(base / folder / rel, k)
        lines[split].append(f"{rel} {listed_pid}")

    train_ids = {p: cams for p, cams in TRAIN_IDS.items()}
    for j, (pid, cams) in enumerate(sorted(train_ids.items())):  # MSMT lists pids 0..N-1 per split
        for cam, n in cams:
            for i in range(n):
                add("val" if (pid == 2 and cam == 2 and i == 0) else "train", "train", j, cam, j)
    for pid, cam in QUERY:
        add("query", "test", pid, cam, pid)
    for pid, cam in GALLERY + [(0, 1), (0, 2)]:  # pid 0 is a real test identity in MSMT17
        add("gallery", "test", pid, cam, pid)
    for split, ls in lines.items():
        (base / f"list_{split}.txt").write_text("\n".join(ls) + "\n")
    exp = _expected({j: cams for j, (_, cams) in enumerate(sorted(train_ids.items()))})
    return tmp, exp


def write_veri(tmp: Path):
    base = tmp / "VeRi"
    k = 0
    names = {"train": [], "query": [], "test": []}

    def add(split, pid, cam):
        nonlocal k
        k += 1
        n = f"{pid:04d}_c{cam:03d}_{k:08d}_0.jpg"
        _jpg(base / f"image_{split}" / n, k)
        names[split].append(n)

    for pid, cams in TRAIN_IDS.items():
        for cam, n in cams:
            for _ in range(n):
                add("train", pid, cam)
    for pid, cam in QUERY:
        add("query", pid, cam)
    for pid, cam in GALLERY + [(0, 1), (0, 2)]:
        add("test", pid, cam)
    for split, ns in names.items():
        (base / f"name_{split}.txt").write_text("\n".join(ns) + "\n")
    return tmp, _expected()


WRITERS = {"market1501": write_market, "dukemtmc": write_duke, "msmt17": write_msmt, "veri776": write_veri}


@pytest.fixture(params=sorted(WRITERS))
def fixture(request, tmp_path):
    root, expected = WRITERS[request.param](tmp_path)
    return request.param, root, expected


def _pc(records):
    return sorted((r[1], r[2]) for r in records)


# ------------------------------------------------------------------ readers
def test_reader_pids_camids_junk_distractors(fixture):
    name, root, exp = fixture
    rec = READERS[name](root)
    assert _pc(rec.train) == exp["train"]  # junk (-1) and train distractors (0) dropped, c1 -> camid 0
    assert _pc(rec.query) == exp["query"]
    assert _pc(rec.gallery) == exp["gallery"]  # distractors (0) kept in the gallery only
    assert all(Path(r[0]).is_file() for r in rec.train + rec.query + rec.gallery)
    if name in ("market1501", "dukemtmc"):
        assert all(r[1] not in (-1, 0) for r in rec.train + rec.query)


def test_datamodule_relabels_and_holds_out_val(fixture):
    name, root, exp = fixture
    dm = ReIDDataModule(dataset=name, root=str(root), img_size=list(HW), batch_size=8, num_instances=2,
                        val_identities=1, seed=3)
    n_ids = len({p for p, _ in exp["train"]})
    assert dm.num_classes == n_ids - 1 and dm.img_hw == HW and dm.img_size == HW
    dm.setup()
    labels = {r[1] for r in dm.train_set.records}
    assert labels == set(range(dm.num_classes))
    orig = {f"{p:04d}" for p, _ in exp["train"]}
    assert set(dm.class_names) < orig and dm.class_names == sorted(dm.class_names)
    val_pid = {r[1] for r in dm.val_set.records}
    assert len(val_pid) == 1 and f"{next(iter(val_pid)):04d}" in orig - set(dm.class_names)  # not in train
    # val: one query per (identity, camera), the rest is gallery; the held-out identity spans 2+ cameras
    q = [r for r in dm.val_set.records if r[3]]
    assert len(q) == len({(r[1], r[2]) for r in q}) == len({r[2] for r in dm.val_set.records}) >= 2
    assert dm.split_sizes("test") == {"query": len(exp["query"]), "gallery": len(exp["gallery"])}
    sizes = dm.split_sizes("val")
    assert sizes["query"] + sizes["gallery"] == sum(1 for p, _ in exp["train"] if p in val_pid)
    items = dm.eval_items("test")
    assert len(items) == len(exp["query"]) + len(exp["gallery"]) and all(Path(i).is_file() for i in items)
    # loaders: the batch contract
    x, pids, camids = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, *HW) and x.dtype == torch.float32 and pids.dtype == camids.dtype == torch.long
    groups = pids.view(4, 2)
    assert (groups == groups[:, :1]).all() and len(pids.unique()) == 4  # P=4 ids x K=2
    batches = list(dm.test_dataloader())
    x, pids, camids, is_q = (torch.cat(t) for t in zip(*batches))
    assert x.shape[1:] == (3, *HW) and is_q.dtype == torch.bool and pids.dtype == torch.long
    nq = len(exp["query"])
    assert is_q[:nq].all() and not is_q[nq:].any()
    assert sorted(zip(pids[:nq].tolist(), camids[:nq].tolist())) == exp["query"]  # ORIGINAL ids
    assert sorted(zip(pids[nq:].tolist(), camids[nq:].tolist())) == exp["gallery"]


@pytest.mark.parametrize("name,victim", [
    ("market1501", "query"), ("dukemtmc", "bounding_box_test"), ("msmt17", "test"), ("veri776", "image_query"),
])
def test_missing_folder_is_named(tmp_path, name, victim):
    root, _ = WRITERS[name](tmp_path)
    folder = next(p for p in root.iterdir() if p.is_dir()) / victim  # the archive's folder, then the victim
    shutil.rmtree(folder)
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(folder))) as e:
        READERS[name](root)
    assert "Expected layout" in str(e.value)


def test_empty_folder_and_missing_list_and_listed_file(tmp_path):
    root, _ = write_market(tmp_path / "m")
    for p in (root / "Market-1501-v15.09.15" / "bounding_box_test").iterdir():
        p.unlink()
    with pytest.raises(DatasetNotFoundError, match="no .jpg images in .*bounding_box_test"):
        READERS["market1501"](root)
    root, _ = write_msmt(tmp_path / "s")
    (root / "MSMT17_V1" / "list_query.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="list_query.txt"):
        READERS["msmt17"](root)
    root, _ = write_veri(tmp_path / "v")  # half-unpacked: a listed file is absent
    gone = sorted((root / "VeRi" / "image_test").iterdir())[0]
    gone.unlink()
    with pytest.raises(DatasetNotFoundError, match=gone.name) as e:
        READERS["veri776"](root)
    assert "name_test.txt" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="needs data.root"):
        ReIDDataModule(dataset="market1501").num_classes
    with pytest.raises(DatasetNotFoundError, match="bounding_box_train"):
        READERS["market1501"](tmp_path / "nothing_here")


def test_bad_file_name_and_bad_image(tmp_path):
    root, _ = write_market(tmp_path)
    base = root / "Market-1501-v15.09.15"
    _jpg(base / "query" / "Thumbs_x.jpg")
    with pytest.raises(DataFormatError, match="Thumbs_x.jpg"):
        READERS["market1501"](root)
    (base / "query" / "Thumbs_x.jpg").unlink()
    broken = sorted((base / "bounding_box_test").glob("0003_*.jpg"))[0]
    broken.write_bytes(b"not a jpeg")
    dm = ReIDDataModule(dataset="market1501", root=str(root), img_size=list(HW), batch_size=8, num_instances=2,
                        val_identities=1)
    dm.setup()
    with pytest.raises(DataFormatError, match=broken.name):
        list(dm.test_dataloader())
    dm = ReIDDataModule(dataset="market1501", root=str(root), img_size=list(HW), batch_size=8, num_instances=2,
                        val_identities=1, bad_images="skip")
    assert dm.split_sizes("test") == {"query": 3, "gallery": 5}  # left out of the gallery, and counted out
    # training: an unreadable image is replaced by another image of the same identity
    victim = dm.train_set.records[0]
    Path(victim[0]).write_bytes(b"broken")
    _, pid, _ = dm.train_set[0]
    assert pid == victim[1] and str(victim[0]) in dm.train_set.skipped


# ------------------------------------------------------------------ sampler
def test_sampler_pk_deterministic_with_replacement():
    pids = [0] * 9 + [1] * 2 + [2] * 4 + [3] * 5 + [4] * 1 + [5] * 8  # ids 1 and 4 have fewer than K=4
    s = IdentitySampler(pids, num_identities=3, num_instances=4, seed=5)
    chunks = 2 + 1 + 1 + 1 + 1 + 2
    assert len(s) == (chunks // 3) * 12
    order = list(s)
    assert len(order) == len(s)
    pids = np.asarray(pids)
    for b in np.asarray(order).reshape(-1, 12):
        groups = pids[b].reshape(3, 4)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 3  # P distinct ids x K each
    drawn = Counter()
    for epoch in range(10):  # identities 1 (2 images) and 4 (1 image) come as K=4 drawn with replacement
        s.set_epoch(epoch)
        for b in np.asarray(list(s)).reshape(-1, 4):
            drawn[int(pids[b[0]])] += 1
            if pids[b[0]] in (1, 4):
                assert set(b) <= set(np.flatnonzero(pids == pids[b[0]]))
    assert drawn[1] > 0 and drawn[4] > 0 and set(drawn) == set(range(6))
    s.set_epoch(0)
    assert list(IdentitySampler(pids, num_identities=3, num_instances=4, seed=5)) == order  # same seed, epoch
    s.set_epoch(1)
    assert list(s) != order
    assert list(IdentitySampler(pids, num_identities=3, num_instances=4, seed=6)) != order
    with pytest.raises(DataFormatError, match="distinct training identities"):
        IdentitySampler(pids, num_identities=7, num_instances=4)


def test_sampler_ranks_draw_different_identities():
    pids = np.repeat(np.arange(12), 6)
    ranks = [IdentitySampler(pids, num_identities=3, num_instances=2, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for b0, b1 in zip(ranks[0].batches(), ranks[1].batches()):
        assert not set(pids[b0]) & set(pids[b1])


def test_batch_size_must_be_multiple_of_k():
    with pytest.raises(ValueError, match="multiple of num_instances"):
        ReIDDataModule(dataset="digit_reid", batch_size=30, num_instances=4)
    assert as_hw(32) == (32, 32) and as_hw([256, 128]) == (256, 128)


# ------------------------------------------------------------------ digit_reid
def test_digit_reid_disjoint_deterministic_and_loaders():
    rec, base = digit_reid_records()
    train_ids, test_ids = {r[1] for r in rec.train}, {r[1] for r in rec.query + rec.gallery}
    assert len(train_ids) == 200 and len(test_ids) == 100 and not train_ids & test_ids
    used = lambda recs: {int(d) for r in recs for d in base[r[0]]}  # noqa: E731
    assert not used(rec.train) & used(rec.query + rec.gallery)  # no handwriting shared
    assert {r[1] for r in rec.query} == {r[1] for r in rec.gallery}
    assert Counter((r[1], r[2]) for r in rec.query).most_common(1)[0][1] == 1  # one query per (id, camera)
    images, _ = render_digit_reid()
    again, _ = render_digit_reid.__wrapped__()
    assert images.dtype == torch.uint8 and torch.equal(images, again)

    dm = DATAMODULES["reid"](dataset="digit_reid", batch_size=64)
    assert dm.task == "reid" and dm.num_classes == 180 and dm.img_hw == (32, 16)
    dm.configure_for_model(input_size=(3, 224, 224), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert dm.img_hw == (32, 16) and dm.mean == (0.5,) * 3  # the protocol's size stays; the model's stats apply
    assert dm.given_input()["img_size"] is None
    dm.setup()
    val_ids = {r[1] for r in dm.val_set.records}
    assert len(val_ids) == 20 and val_ids <= train_ids
    assert not {int(c) for c in dm.class_names} & val_ids  # val identities are not trained on
    assert dm.split_sizes("val") == {"query": 80, "gallery": 80}
    assert dm.split_sizes("test") == {"query": 400, "gallery": 400}
    x, pids, camids = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 16) and len(pids.unique()) == 16
    assert (pids.view(16, 4) == pids.view(16, 4)[:, :1]).all()
    x, pids, camids, is_q = next(iter(dm.val_dataloader()))
    assert x.shape == (64, 3, 32, 16) and is_q.all() and set(pids.tolist()) <= val_ids
    names = dm.eval_items("test")
    assert names[0].startswith("digit_reid/test/query/") and names[-1].startswith("digit_reid/test/gallery/")
    assert ReIDDataModule(dataset="digit_reid", val_identities=0).val_dataloader() == []
    assert ReIDDataModule(dataset="digit_reid", val_identities=0).num_classes == 200
    dm = ReIDDataModule(dataset="digit_reid", img_size=24, in_chans=1, augment=False, batch_size=8, num_instances=2)
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 24, 24)


def test_hydra_configs_build_the_datamodule(compose_cfg, tmp_path):
    from hydra.utils import instantiate

    dm = instantiate(compose_cfg("train", ["data=digit_reid"]).data)
    assert isinstance(dm, ReIDDataModule) and dm.img_hw == (32, 16) and dm.hparams.num_instances == 4
    root, exp = write_veri(tmp_path / "veri")
    cfg = compose_cfg("train", ["data=veri776", f"data.root={root}", "data.num_workers=0", "data.img_size=[16,16]"])
    dm = instantiate(cfg.data)
    assert dm.img_hw == (16, 16) and dm.hparams.padding == 10
    assert dm.num_classes == len({p for p, _ in exp["train"]}) - 1  # 5 % of 6 identities: one held out
    for name in ("market1501", "dukemtmc", "msmt17"):
        cfg = compose_cfg("train", [f"data={name}"]).data
        assert list(cfg.img_size) == [256, 128] and cfg.batch_size == 64 and cfg.num_instances == 4


def test_msmt_val_list_and_veri_without_name_lists(tmp_path):
    root, exp = write_msmt(tmp_path / "s")
    assert len(READERS["msmt17"](root).train) == len(exp["train"])  # list_val.txt joins training (TransReID)
    assert len(READERS["msmt17"](root, combine_val=False).train) == len(exp["train"]) - 1  # torchreid's default
    root, exp = write_veri(tmp_path / "v")
    for f in (root / "VeRi").glob("name_*.txt"):
        f.unlink()
    rec = READERS["veri776"](root)  # the folders' *.jpg, as torchreid and TransReID read them
    assert _pc(rec.train) == exp["train"] and _pc(rec.gallery) == exp["gallery"]


@pytest.mark.parametrize("data", ["digit_reid", "market1501", "veri776"])
def test_reid_data_configs_pass_the_config_check_with_their_hw_size(data, compose_cfg):
    """configs/data/*.yaml give img_size as [H, W]; the run's config check must accept it."""
    from omegaconf import OmegaConf

    from zoo.validate import check_run_config

    cfg = compose_cfg("train", ["model=vit_nano", f"data={data}"])
    check_run_config(OmegaConf.to_container(cfg, resolve=True), training=True)
    assert len(cfg.data.img_size) == 2
