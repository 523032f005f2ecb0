"""DCAL for Re-ID: the official layouts (256 x 128 persons, 256 x 256 vehicles, R = 30%), PWCA in training
only, the SA + GLCA concatenated inference feature, the SA-only baseline, the task training it through
``feature_objective``, and the R50 + ViT-B/16 hybrid's parameters."""
from __future__ import annotations

import lightning as L
import pytest
import timm
import torch

import zoo
from zoo.data import ReIDDataModule
from zoo.layers.cross_attention import DCALBlock
from zoo.models.dcal import checkpoint_filter_fn
from zoo.runner import build_task, prepare_data



pytestmark = pytest.mark.usefixtures("one_intra_op_thread_per_module")


def _nano(**kw):
    # 64 x 32 px with 4 x 4 patches: the 16 x 8 token grid of ViT-B/16 at 256 x 128
    torch.manual_seed(0)
    return zoo.create_model("dcal_deit_nano", num_classes=0, img_size=[64, 32], glca_ratio=0.3, **kw)


def test_official_layouts_on_meta_with_timm_weights():
    with torch.device("meta"):
        person = zoo.create_model("dcal_vit_base", num_classes=0, img_size=[256, 128], glca_ratio=0.3)
        vehicle = zoo.create_model("dcal_vit_base", num_classes=0, img_size=[256, 256], glca_ratio=0.3)
        src = timm.create_model("vit_base_patch16_224", num_classes=0)
    assert person.patch_embed.grid_size == (16, 8) and person.num_selected(128) == 38  # R = 30% of 128
    assert vehicle.patch_embed.grid_size == (16, 16) and vehicle.num_selected(256) == 77
    assert person.head_hidden_size == 2 * 768 and person.feature_heads() == {"sa": 768, "glca": 768}
    sd = checkpoint_filter_fn(src.state_dict(), person)  # 14 x 14 -> 16 x 8 position embeddings
    own = person.state_dict()
    assert set(sd) == set(own) and all(sd[k].shape == own[k].shape for k in own)


def test_reid_feature_is_sa_and_glca_class_tokens_and_pwca_is_training_only():
    net = _nano().eval()
    x = torch.randn(3, 3, 64, 32)
    assert net.num_selected(128) == 38 and net.selected_tokens(x).shape == (3, 38)
    with torch.no_grad():
        feat = net.forward_head(net.forward_features(x), pre_logits=True)
        o = net._run(x)
        other = net.forward_head(net.forward_features(torch.cat([x[:1], torch.randn(2, 3, 64, 32)])), pre_logits=True)
    assert feat.shape == (3, 128) and torch.equal(feat, net(x))  # num_classes=0: forward gives the feature
    assert torch.allclose(feat, torch.cat([o["sa"][:, 0], o["glca"][:, 0]], 1))
    assert torch.allclose(feat[0], other[0], atol=1e-5)  # no partner image at inference

    calls = []
    pwca_steps = []
    orig = DCALBlock.forward_pwca

    def counting(self, *a):
        pwca_steps.append(1)
        return orig(self, *a)

    def criterion(head, f, y):
        calls.append((head, f))
        return f.pow(2).mean() + y.float().mean()

    DCALBlock.forward_pwca = counting
    try:
        with torch.no_grad():
            net.forward_head(net.forward_features(x), pre_logits=True)
        assert pwca_steps == []  # PWCA never runs at inference
        net.train()
        losses = net.forward_train_features(x, torch.tensor([0, 1, 2]), criterion)
    finally:
        DCALBlock.forward_pwca = orig
    assert len(pwca_steps) == len(net.blocks)  # T = L PWCA steps with the SA blocks' weights
    assert [h for h, _ in calls] == ["sa", "glca", "sa"]  # PWCA's token goes to the SA head (shared weights)
    assert set(losses) == {"sa", "glca", "pwca"} and not torch.allclose(calls[0][1], calls[2][1])
    w = net.loss_log_vars
    raw = [f.pow(2).mean() + 1.0 for _, f in calls]  # the criterion's values (y = 0, 1, 2: mean 1)
    expected = sum(0.5 * (torch.exp(-w[i]) * raw[i] + w[i]) for i in range(3))
    assert torch.allclose(sum(losses.values()), expected)


def test_sa_only_baseline_is_a_plain_vit():
    net = _nano(glca=False, pwca=False)
    ref = timm.models.VisionTransformer(img_size=(64, 32), patch_size=4, num_classes=0, embed_dim=64, depth=4,
                                        num_heads=4, mlp_ratio=2.0, dynamic_img_size=True)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ref.parameters())
    assert net.feature_heads() == net.feature_heads(inference=True) == {"sa": 64} and net.head_hidden_size == 64
    heads = []
    losses = net.forward_train_features(torch.randn(2, 3, 64, 32), torch.tensor([0, 1]),
                                        lambda h, f, y: heads.append(h) or f.sum())
    assert heads == ["sa"] and set(losses) == {"sa"}


def test_reid_task_trains_dcal_with_one_bnneck_per_head(tmp_path):
    dm = ReIDDataModule(dataset="digit_reid", batch_size=32, num_instances=4)  # 32 x 16: 8 x 4 tokens
    prepare_data(dm, "dcal_deit_nano")
    task = build_task({"name": "dcal_deit_nano", "kwargs": {"glca_ratio": 0.3}}, dm,
                      optim={"name": "adamw", "lr": 2e-3, "label_smoothing": 0.0}, reid={"neck_feat": "after"})
    assert set(task.heads) == {"sa", "glca"} and task.net.num_classes == 0 and task.net.num_selected(32) == 10
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_epochs=1, limit_train_batches=4, log_every_n_steps=1)
    trainer.fit(task, datamodule=dm)
    logged = trainer.callback_metrics
    assert {"train/sa", "train/glca", "train/pwca", "train/id", "train/triplet", "val/map"} <= set(logged)
    metrics = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert all(0 <= metrics[f"test/{k}"] <= 1 for k in ("map", "rank1", "rank5", "rank10"))
    x = next(iter(dm.test_dataloader()))[0][:4]
    task.eval()
    with torch.no_grad():  # neck_feat="after": each head's slice of the feature through its own BN
        f = task.net(x)
        after = torch.cat([task.heads["sa"].bottleneck(f[:, :64]), task.heads["glca"].bottleneck(f[:, 64:])], 1)
        assert torch.allclose(task.features(x), after)


def test_hybrid_r50_vit_b_parameters_are_timms_plus_the_glca_branch():
    with torch.device("meta"):
        net = zoo.create_model("dcal_vit_base_r50", num_classes=200, img_size=448)
        ref = timm.create_model("vit_base_r50_s16_224", num_classes=200, img_size=448)
        block = timm.models.vision_transformer.Block(768, 12, qkv_bias=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    glca = count(block) + 2 * 768 + (768 * 200 + 200) + 3  # GLCA block, its norm and classifier, 3 loss weights
    assert count(net) == count(ref) + glca
    assert net.patch_embed.grid_size == (28, 28) and net.num_selected(784) == 78
    sd = checkpoint_filter_fn(ref.state_dict(), net)  # timm's hybrid weights load, GLCA from the last block
    own = net.state_dict()
    assert set(sd) == set(own) and all(sd[k].shape == own[k].shape for k in own)


def test_the_digit_reid_demo_trains_in_process_and_evaluates_with_pictures(compose_cfg, tmp_path):
    """The demo recipe through train.py (a few steps): test metrics written, finite, in [0, 1]; evaluate.py
    on the DCAL checkpoint gives the same metrics and draws the GLCA selection and rollout on query images."""
    from evaluate import evaluate
    from train import train

    short = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "callbacks.rich_progress_bar=null",
             "callbacks.rich_model_summary=null", "test_last=false"]
    cfg = compose_cfg("train", ["experiment=dcal_deit_nano_digit_reid", *short], out_dir=tmp_path / "run")
    metrics = train(cfg)  # (the SA-only recipe differs in model.kwargs only; tests/test_pipeline.py builds it)
    assert set(metrics) == {"test/map", "test/rank1", "test/rank5", "test/rank10"}
    assert all(0 <= v <= 1 for v in metrics.values()), metrics

    best = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    ecfg = compose_cfg("evaluate", ["data=digit_reid", "data.img_size=null", f"ckpt_path={best}", "explain=true",
                                    f"explain_dir={tmp_path / 'maps'}", "explain_images=2",
                                    "callbacks.rich_progress_bar=null"], out_dir=tmp_path / "eval")
    again = evaluate(ecfg)
    assert again == pytest.approx(metrics, abs=1e-6)
    reranked = evaluate(compose_cfg("evaluate", ["data=digit_reid", "data.img_size=null", f"ckpt_path={best}",
                                                 "+reid.re_ranking=true", "+reid.re_ranking_k1=20", "+reid.re_ranking_k2=6",
                                                 "callbacks.rich_progress_bar=null"], out_dir=tmp_path / "eval_rr"))
    assert set(reranked) == set(metrics) and reranked["test/map"] != pytest.approx(metrics["test/map"], abs=1e-6)
    assert all(0 <= v <= 1 for v in reranked.values())
    with pytest.raises(Exception, match="reid.triplet_margin is a training option"):
        evaluate(compose_cfg("evaluate", ["data=digit_reid", "data.img_size=null", f"ckpt_path={best}",
                                          "+reid.triplet_margin=0.5"], out_dir=tmp_path / "eval_bad"))
    drawn = sorted(p.name for p in (tmp_path / "maps").glob("*.png"))
    assert len(drawn) == 6 and any("glca_queries" in n for n in drawn) and any("rollout" in n for n in drawn)

    # `zoo explain` on an image file: the checkpoint's 32 x 16 input, no class named for a feature extractor
    from PIL import Image

    from zoo.__main__ import main

    Image.fromarray((torch.rand(64, 32, 3) * 255).byte().numpy()).save(tmp_path / "query.png")
    assert main(["explain", "--ckpt", str(best), str(tmp_path / "query.png"), "--out", str(tmp_path / "cli")]) == 0
    assert {p.name for p in (tmp_path / "cli").glob("*.png")} == {
        "query_rollout.png", "query_glca_queries.png", "query_glca_cls_attention.png"}
