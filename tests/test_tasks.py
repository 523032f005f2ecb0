"""Task modules: the forward_train contract, optimizer groups, the schedule and the metrics' definitions."""
import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zoo.contract import Capabilities, ZooModel
from zoo.tasks import ClassificationTask, MILTask, SegmentationTask
from zoo.tasks.base import warmup_cosine, warmup_step
from zoo.tasks.segmentation import scores_from_confusion


class NetWithObjective(ZooModel, nn.Module):
    """A net with its own training objective (declared): the task must sum and log exactly these losses."""

    zoo_capabilities = Capabilities(own_objective=True)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(4)
        self.pos = nn.Parameter(torch.zeros(4))
        self.calls = 0

    def no_weight_decay(self):
        return {"pos"}

    def forward(self, x):
        return self.fc(self.norm(x) + self.pos)

    def forward_train(self, x, y):
        self.calls += 1
        logits = self(x)
        return logits, {"main": nn.functional.cross_entropy(logits, y), "aux": logits.square().mean() * 0 + 0.5}


def _task(net, cls=ClassificationTask, **kw):
    return cls(net, model={"name": "x", "kwargs": {}}, num_classes=3, **kw)


def test_forward_train_losses_are_summed_and_logged():
    net = NetWithObjective()
    task = _task(net)
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, value)
    task.log_dict = lambda d, **kw: logged.update(d)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    loss = task.training_step((x, y), 0)
    expected = nn.functional.cross_entropy(net(x), y) + 0.5
    assert net.calls == 1 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert {"train/loss", "train/main", "train/aux"} <= set(logged)


def test_no_weight_decay_on_norms_biases_and_declared_params():
    net = NetWithObjective()
    task = _task(net, optim={"name": "sgd", "lr": 0.1, "weight_decay": 0.1, "scheduler": "none"})
    opt = task.configure_optimizers()
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_wd[0.1] == {id(net.fc.weight)}
    assert by_wd[0.0] == {id(net.fc.bias), id(net.norm.weight), id(net.norm.bias), id(net.pos)}
    assert isinstance(opt, torch.optim.SGD)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10, 0.01, 0.0) == pytest.approx(0.01)
    assert warmup_cosine(10, 100, 10, 0.01, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.01, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 0.01, 0.1) == pytest.approx(0.1)


def test_scheduler_runs_per_step_inside_a_trainer(tmp_path):
    net = NetWithObjective()
    task = _task(net, optim={"lr": 0.1, "warmup_epochs": 1})
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(task, DataLoader(data, batch_size=8))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.1 * warmup_cosine(8, 8, 4, 0.01, 0.01))


def test_step_schedule_is_multistep_lr_at_fractions_of_the_run():
    """scheduler="step" (DTFD-MIL's x0.2 at epoch 100 of 200): torch's MultiStepLR with milestones at those
    fractions of the run's steps."""
    p = nn.Parameter(torch.zeros(1))
    ref = torch.optim.SGD([p], lr=1.0)
    multistep = torch.optim.lr_scheduler.MultiStepLR(ref, [100, 150], gamma=0.2)
    for s in range(200):
        assert warmup_step(s, 200, 0, 0.01, [0.5, 0.75], 0.2) == pytest.approx(ref.param_groups[0]["lr"]), s
        ref.step()
        multistep.step()
    assert warmup_step(0, 200, 10, 0.01, [0.5], 0.2) == pytest.approx(0.01)  # after a warmup, as the cosine's


def test_step_schedule_and_unknown_schedulers_inside_a_trainer(tmp_path):
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    kw = dict(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    task = _task(NetWithObjective(), optim={"lr": 0.1, "warmup_epochs": 0, "scheduler": "step",
                                            "lr_decay_at": [0.5], "lr_decay_rate": 0.2})
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    L.Trainer(callbacks=[Record()], **kw).fit(task, DataLoader(data, batch_size=8))
    assert seen == pytest.approx([0.1] * 4 + [0.02] * 4)  # the drop at step 4 of 8, the start of epoch 2
    task = _task(NetWithObjective(), optim={"scheduler": "linear"})
    with pytest.raises(ValueError, match="optim.scheduler must be one of cosine, step, none"):
        L.Trainer(**kw).fit(task, DataLoader(data, batch_size=8))


def test_segmentation_scores_are_dataset_level():
    # class 0: tp 8 of 10 labelled; class 1: tp 1, fp 2, fn 0
    cm = torch.tensor([[8, 2], [0, 1]])
    s = scores_from_confusion(cm)
    assert s["iou"][0].item() == pytest.approx(8 / 10) and s["iou"][1].item() == pytest.approx(1 / 3)
    assert s["dice"][1].item() == pytest.approx(2 / 4) and s["acc"].item() == pytest.approx(9 / 11)


def test_segmentation_metrics_ignore_255_and_log_per_class():
    net = nn.Conv2d(3, 2, 1)
    task = _task(net, cls=SegmentationTask, data_info={"class_names": ["bg", "fg"]})
    task.hparams.num_classes = 2
    task.metrics = nn.ModuleDict({s: task.make_metrics() for s in ("val", "test")})
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, :] = 1  # predicts fg on the top row
    y = torch.tensor([[[1, 255], [0, 0]]])
    task.update_metrics(task.metrics["test"], logits, y)
    m = task.compute_metrics(task.metrics["test"])
    assert m["iou_fg"].item() == pytest.approx(1.0) and m["iou_bg"].item() == pytest.approx(1.0)
    assert m["miou"].item() == pytest.approx(1.0) and m["dice"].item() == pytest.approx(1.0)


def test_mil_f1_is_really_macro():
    task = MILTask(nn.Linear(2, 2), model={"name": "x", "kwargs": {}}, num_classes=2)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    pred = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    logits = nn.functional.one_hot(pred, 2).float() * 5
    task.update_metrics(task.metrics["test"], logits, y)
    m = task.compute_metrics(task.metrics["test"])
    assert m["acc"].item() == pytest.approx(0.9)
    assert m["balanced_acc"].item() == pytest.approx((1 + 0.5) / 2)
    f1_pos = 2 * 1 / (2 * 1 + 0 + 1)
    f1_neg = 2 * 8 / (2 * 8 + 1 + 0)
    assert m["f1"].item() == pytest.approx((f1_pos + f1_neg) / 2)
    assert m["auroc"].item() == pytest.approx(0.75)


def test_mixup_cutmix_soft_targets_and_loss():
    """optim.mixup_alpha / cutmix_alpha: timm Mixup on the batch, soft-target CE; an odd batch drops one sample."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    task = _task(net, optim={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1})
    seen = {}
    task.log = lambda name, value, **kw: seen.__setitem__(name, value)
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))
    torch.manual_seed(0)
    xm, ym = task.mix(x.clone(), y)  # timm mixes in place
    assert xm.shape == (4, 3, 8, 8) and ym.shape == (4, 3)
    assert torch.allclose(ym.sum(-1), torch.ones(4)) and not torch.equal(xm, x[:4])
    expected = torch.sum(-ym * torch.log_softmax(net(xm), -1), -1).mean()
    assert task.criterion(net(xm), ym).item() == pytest.approx(expected.item(), rel=1e-6)
    loss = task.training_step((x, y), 0)
    assert torch.isfinite(loss) and "train/loss" in seen
    assert _task(net).mix(x, y)[1] is y  # off by default


def test_mixup_refused_for_models_with_their_own_hard_label_objective():
    with pytest.raises(ValueError, match="mixup_alpha=0"):
        _task(NetWithObjective(), optim={"mixup_alpha": 0.8})


def test_metrics_stay_separate_after_a_perfect_first_batch():
    """torchmetrics' compute groups merged macro-F1 with top-5 accuracy when the first batch was perfect."""
    m = ClassificationTask(nn.Linear(2, 10), model={"name": "x", "kwargs": {}}, num_classes=10).metrics["test"]
    y = torch.arange(10)
    m.update(nn.functional.one_hot(y, 10).float() * 5, y)  # all right
    wrong_top1 = nn.functional.one_hot((y + 1) % 10, 10).float() * 5 + nn.functional.one_hot(y, 10).float() * 4
    m.update(wrong_top1, y)  # top-1 all wrong, top-5 all right
    out = {k: float(v) for k, v in m.compute().items() if k not in ClassificationTask.figure_keys}  # numbers only
    assert out["acc"] == pytest.approx(0.5) and out["acc5"] == pytest.approx(1.0)
    assert out["f1"] == pytest.approx(0.5)
