"""ADE20K, Oxford-IIIT Pet trimaps and CHAOS slices from fixtures in their published layouts; sliding-window inference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from zoo.data import SegmentationDataModule
from zoo.errors import DatasetNotFoundError
from zoo.tasks.segmentation import slide_inference


def _img(path, h, w, seed, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)


def _mask(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "L").save(path)


def write_ade20k(tmp):
    base = tmp / "ADEChallengeData2016"
    for part, n in (("training", 6), ("validation", 2)):
        for i in range(n):
            name = f"ADE_{part[:5]}_{i:08d}"
            _img(base / "images" / part / f"{name}.jpg", 40, 56, i)  # not square: aspect kept at eval
            m = np.zeros((40, 56), np.uint8)
            m[:, 20:] = 1
            m[10:20, 30:40] = 150
            _mask(base / "annotations" / part / f"{name}.png", m)
    return tmp


def test_ade20k_reduce_zero_label_and_splits(tmp_path):
    root = write_ade20k(tmp_path)
    dm = SegmentationDataModule(dataset="ade20k", root=str(root), img_size=32, batch_size=2, val_fraction=0.2,
                                eval_resize="short_side", inference={"mode": "slide", "crop": 32, "stride": 21})
    dm.setup()
    assert dm.num_classes == 150 and len(dm.test_set) == 2 and len(dm.train_set) + len(dm.val_set) == 6
    x, y = dm.test_set[0]
    assert x.shape == (3, 32, 44)  # short side 32, aspect 56/40 kept (44.8 truncated)
    vals = set(torch.unique(y).tolist())
    assert vals <= {255, 0, 149} and 255 in vals and 149 in vals  # 0 ignored, 1 -> 0, 150 -> 149
    xb, yb = next(iter(dm.test_dataloader()))
    assert xb.shape[0] == 1  # native-aspect evaluation goes one image at a time
    xt, yt = next(iter(dm.train_dataloader()))
    assert xt.shape == (2, 3, 32, 32) and yt.shape == (2, 32, 32)


def test_pet_trimaps(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for part, names in (("trainval", ["Abyssinian_1", "Abyssinian_2", "beagle_1", "beagle_2"]), ("test", ["beagle_3"])):
        for k, n in enumerate(names):
            _img(base / "images" / f"{n}.jpg", 30, 40, k)
            m = np.full((30, 40), 2, np.uint8)
            m[5:25, 5:35] = 3
            m[8:22, 8:32] = 1
            _mask(base / "annotations" / "trimaps" / f"{n}.png", m)
        (base / "annotations" / f"{part}.txt").write_text("\n".join(f"{n} 1 1 1" for n in names) + "\n")
    dm = SegmentationDataModule(dataset="pet_trimaps", root=str(tmp_path), img_size=32, val_fraction=0.25)
    dm.setup()
    assert dm.class_names == ["pet", "background", "border"] and len(dm.test_set) == 1
    x, y = dm.test_set[0]
    assert x.shape == (3, 32, 32) and set(torch.unique(y).tolist()) == {0, 1, 2}


def test_chaos_config_reads_the_official_slice_layout(compose_cfg, tmp_path):
    from hydra.utils import instantiate

    for split in ("train", "val", "test"):
        for k in range(3):
            _img(tmp_path / split / "Img" / f"Subj_{k}slice_{k + 1}.png", 32, 32, k, mode="L")
            m = np.zeros((32, 32), np.uint8)
            m[4:12, 4:12], m[16:24, 16:24], m[0:4, 28:32] = 63, 252, 126
            _mask(tmp_path / split / "GT" / f"Subj_{k}slice_{k + 1}.png", m)
    cfg = compose_cfg("train", ["model=fpn_tiny", "data=chaos", f"data.root={tmp_path}", "data.img_size=32",
                                "data.num_workers=0"])
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    x, y = dm.test_set[0]
    assert x.shape == (1, 32, 32) and set(torch.unique(y).tolist()) == {0, 1, 2, 4}
    assert dm.class_names[4] == "spleen" and len(dm.train_set) == 3


def test_missing_segmentation_dataset_says_how_to_get_it(tmp_path):
    for name in ("ade20k", "pet_trimaps"):
        with pytest.raises(DatasetNotFoundError, match="How to get it"):
            SegmentationDataModule(dataset=name, root=str(tmp_path / "none"), img_size=32).setup()
    root = write_ade20k(tmp_path)
    victim = sorted((root / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))[0]
    victim.unlink()
    with pytest.raises(DatasetNotFoundError, match=victim.name):
        SegmentationDataModule(dataset="ade20k", root=str(root), img_size=32).setup()


class PixelNet(nn.Module):
    """A position-independent per-pixel net: sliding windows must reproduce its whole-image output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("h,w", [(40, 56), (20, 24), (64, 64)])
def test_slide_inference_equals_whole_for_a_pointwise_net(h, w):
    net = PixelNet().eval()
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        out = slide_inference(net, x, crop=32, stride=21, num_classes=4)
        ref = net(x)
    assert out.shape == (2, 4, h, w)
    if h >= 32 and w >= 32:
        assert torch.allclose(out, ref, atol=1e-6)
    else:  # zero padding to the crop: still pointwise, so equal on the real pixels
        assert torch.allclose(out, ref, atol=1e-6)


def test_segmentation_task_uses_the_datamodule_inference_mode():
    from zoo.tasks import SegmentationTask

    calls = []

    class Spy(PixelNet):
        def forward(self, x):
            calls.append(tuple(x.shape[-2:]))
            return super().forward(x)

    task = SegmentationTask(Spy(), model={"name": "x", "kwargs": {}}, num_classes=4,
                            data_info={"inference": {"mode": "slide", "crop": 16, "stride": 16}})
    out = task.eval_forward(torch.randn(1, 3, 32, 48))
    assert out.shape == (1, 4, 32, 48) and calls == [(16, 16)] * 6
