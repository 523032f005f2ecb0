"""The Re-ID task: retrieval metrics (checked against torchmetrics and TransReID's eval_func), the batch-hard
triplet loss (against TransReID's), BNNeck training of a plain classification net through the contract,
checkpoint round trip and the whole-split rule."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP

from zoo.data import ReIDDataModule
from zoo.errors import TaskMismatchError
from zoo.reid_metrics import distance_matrix, re_ranking, retrieval_metrics
from zoo.runner import build_task, load_task, prepare_data
from zoo.tasks import ReIDTask
from zoo.tasks.reid import batch_hard_triplet
from zoo.validate import ConfigError



pytestmark = pytest.mark.usefixtures("one_intra_op_thread_per_module")


# ----------------------------------------------------------------------------------------------- metrics
def transreid_eval_func(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """TransReID utils/metrics.py eval_func, re-typed here (numpy, one query at a time)."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap = [], []
    for q in range(num_q):
        order = indices[q]
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        orig = matches[q][keep]
        if not np.any(orig):
            continue
        cmc = orig.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        tmp = orig.cumsum() / np.arange(1, len(orig) + 1) * orig
        all_ap.append(tmp.sum() / orig.sum())
    return np.asarray(all_cmc, dtype=np.float32).sum(0) / len(all_cmc), float(np.mean(all_ap))


def test_metrics_on_a_hand_computed_ranking():
    # one query (pid 1, cam 0); gallery by distance: other id, pid 1 same camera (excluded), pid 1, other, pid 1
    q = torch.zeros(1, 2)
    g = torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0], [5, 0]])
    g_pids, g_cams = torch.tensor([7, 1, 1, 8, 1]), torch.tensor([1, 0, 1, 1, 2])
    out = retrieval_metrics(q, g, torch.tensor([1]), g_pids, torch.tensor([0]), g_cams, ranks=(1, 2, 5))
    # kept list: 7, 1, 8, 1 -> matches at ranks 2 and 4: AP = (1/2 + 2/4) / 2
    assert out["map"].item() == pytest.approx(0.5)
    assert (out["rank1"].item(), out["rank2"].item(), out["rank5"].item()) == (0.0, 1.0, 1.0)
    # a query whose identity the gallery only has from its own camera is not counted
    out2 = retrieval_metrics(torch.zeros(2, 2), g, torch.tensor([1, 9]), g_pids, torch.tensor([0, 0]), g_cams)
    assert out2["valid_queries"].item() == 1 and out2["map"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no query has a match"):
        retrieval_metrics(q, g[:2], torch.tensor([1]), g_pids[:2], torch.tensor([0]), torch.tensor([1, 0]))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_metrics_match_torchmetrics_and_transreid_eval_func(distance):
    g = torch.Generator().manual_seed(3)
    nq, ng, ids = 12, 60, 8
    qf, gf = torch.randn(nq, 16, generator=g), torch.randn(ng, 16, generator=g)
    q_pids, g_pids = torch.randint(ids, (nq,), generator=g), torch.randint(ids, (ng,), generator=g)
    q_cams, g_cams = torch.randint(3, (nq,), generator=g), torch.randint(3, (ng,), generator=g)
    gf[:8], g_pids[:8] = gf[:8] + 2 * qf[:8], q_pids[:8]  # some true matches close to their queries
    ours = retrieval_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, distance=distance, block=5)

    dist = distance_matrix(qf, gf, distance)
    cmc, m_ap = transreid_eval_func(dist.numpy(), q_pids.numpy(), g_pids.numpy(), q_cams.numpy(), g_cams.numpy())
    assert ours["map"].item() == pytest.approx(m_ap, abs=1e-6)
    for k in (1, 5, 10):
        assert ours[f"rank{k}"].item() == pytest.approx(float(cmc[k - 1]), abs=1e-6)

    keep = ~((q_pids[:, None] == g_pids[None]) & (q_cams[:, None] == g_cams[None]))
    qi, gi = torch.nonzero(keep, as_tuple=True)
    # torchmetrics counts only positive scores as retrieved: a positive, decreasing function of the distance
    preds, target = 1 / (1 + dist[qi, gi]), q_pids[qi] == g_pids[gi]
    assert ours["map"].item() == pytest.approx(RetrievalMAP(empty_target_action="skip")(preds, target, qi).item(), abs=1e-6)
    for k in (1, 5, 10):
        hit = RetrievalHitRate(top_k=k, empty_target_action="skip")(preds, target, qi).item()
        assert ours[f"rank{k}"].item() == pytest.approx(hit, abs=1e-6)


# ----------------------------------------------------------------------------------------------- losses
def transreid_triplet(feat, labels, margin):
    """TransReID loss/triplet_loss.py TripletLoss (euclidean_dist + hard_example_mining), re-typed here."""
    n = feat.size(0)
    xx = feat.pow(2).sum(1, keepdim=True).expand(n, n)
    dist = (xx + xx.t() - 2 * feat @ feat.t()).clamp(min=1e-12).sqrt()
    is_pos = labels.expand(n, n).eq(labels.expand(n, n).t())
    d_ap = dist[is_pos].contiguous().view(n, -1).max(1)[0]
    d_an = dist[~is_pos].contiguous().view(n, -1).min(1)[0]
    y = torch.ones_like(d_an)
    if margin is None:
        return torch.nn.SoftMarginLoss()(d_an - d_ap, y)
    return torch.nn.MarginRankingLoss(margin=margin)(d_an, d_ap, y)


def _rerank_loops(q, g, k1, k2, lam):
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) written as the paper states it, in float64 with sets."""
    f = torch.cat([q, g]).double()
    n, nq = len(f), len(q)
    d = torch.cdist(f, f) ** 2
    d = d / d.max(1, keepdim=True).values
    order = d.argsort(dim=1, stable=True).tolist()

    def reciprocal(i, k):
        return {j for j in order[i][:k + 1] if i in order[j][:k + 1]}

    V = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, round(k1 / 2))
            if len(rc & r) > 2 / 3 * len(rc):
                expanded |= rc
        cols = sorted(expanded)
        w = torch.exp(-d[i, cols])
        V[i, cols] = w / w.sum()
    V = torch.stack([V[order[i][:k2]].mean(0) for i in range(n)])
    m = torch.minimum(V[:nq, None, :], V[None]).sum(-1)
    return ((1 - lam) * (1 - m / (2 - m)) + lam * d[:nq])[:, nq:]


def _clusters(n, ids=8, noise=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(ids, 16, generator=g)
    pid = torch.arange(n) % ids
    return torch.nn.functional.normalize(centers[pid] + noise * torch.randn(n, 16, generator=g), dim=1), pid


@pytest.mark.parametrize("k1,k2", [(6, 3), (8, 1), (4, 6)])
def test_re_ranking_equals_the_algorithm_written_out(k1, k2):
    f, pid = _clusters(60)
    q, g = f[:12], f[12:]
    ours = re_ranking(q, g, k1, k2, 0.3)
    assert ours.shape == (12, 48)
    torch.testing.assert_close(ours.double(), _rerank_loops(q, g, k1, k2, 0.3), atol=2e-6, rtol=0)


def test_re_ranked_distances_are_ranked_by_the_metrics_and_help_on_clusters():
    f, pid = _clusters(400, ids=20, noise=1.2)
    cam = torch.arange(400) % 3
    q, g = slice(0, 80), slice(80, None)
    args = (f[q], f[g], pid[q], pid[g], cam[q], cam[g])
    plain = retrieval_metrics(*args)
    reranked = retrieval_metrics(*args, distmat=re_ranking(f[q], f[g], k1=20, k2=6, lambda_value=0.3))
    assert reranked["map"] > plain["map"] + 0.05, (plain["map"], reranked["map"])  # its point: neighbours agree
    with pytest.raises(ValueError, match=r"distmat must be \[nq, ng\] = \[80, 320\]"):
        retrieval_metrics(*args, distmat=torch.zeros(80, 319))
    with pytest.raises(ValueError, match="k1 >= 1"):
        re_ranking(f[q], f[g], k1=0)


@pytest.mark.parametrize("margin", [0.3, None])
def test_batch_hard_triplet_matches_transreid(margin):
    torch.manual_seed(0)
    feat = torch.randn(16, 8, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(4)  # P x K = 4 x 4
    ours = batch_hard_triplet(feat, labels, margin)
    ref = transreid_triplet(feat, labels, margin)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    g1, = torch.autograd.grad(ours, feat)
    g2, = torch.autograd.grad(ref, feat)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert batch_hard_triplet(feat, torch.zeros(16, dtype=torch.long)).item() == 0.0  # no negative anywhere


# ----------------------------------------------------------------------------------------------- the task
def digit_reid(**kw) -> ReIDDataModule:
    """The embedded Re-ID demo (32 x 16 digit pairs, 4 cameras): 180 train identities, 20 val, 100 test."""
    return ReIDDataModule(dataset="digit_reid", batch_size=32, num_instances=4, **kw)


def _fit(task, dm, tmp_path, **kw):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), **kw)
    trainer.fit(task, datamodule=dm)
    return trainer


def test_plain_net_trains_for_reid_with_bnneck_and_restores_from_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    dm = digit_reid()
    prepare_data(dm, "vit_nano")
    task = build_task({"name": "vit_nano"}, dm, optim={"name": "adamw", "lr": 2e-3, "label_smoothing": 0.0},
                      reid={"triplet_margin": None, "neck_feat": "after"})
    assert isinstance(task, ReIDTask) and task.net.num_classes == 0
    assert task.hparams.num_classes == 0 and task.hparams.num_ids == dm.num_classes == 180
    assert task.hparams.model["kwargs"]["img_size"] == [32, 16]  # the non-square Re-ID input
    head = task.heads["feat"]
    assert head.classifier.bias is None and not head.bottleneck.bias.requires_grad
    opt_params = {id(p) for g in task.param_groups(0.05) for p in g["params"]}
    assert id(head.classifier.weight) in opt_params and id(head.bottleneck.weight) in opt_params
    assert id(head.bottleneck.bias) not in opt_params

    trainer = _fit(task, dm, tmp_path, max_epochs=1, limit_train_batches=6, enable_checkpointing=True)
    assert {"val/map", "val/rank1", "train/id", "train/triplet"} <= set(trainer.callback_metrics)
    metrics = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert set(metrics) == {"test/map", "test/rank1", "test/rank5", "test/rank10"}
    assert all(0 <= v <= 1 for v in metrics.values())
    assert metrics["test/rank1"] <= metrics["test/rank5"] <= metrics["test/rank10"]

    ckpt = tmp_path / "reid.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = load_task(str(ckpt))
    assert isinstance(restored, ReIDTask) and restored.hparams.reid == task.hparams.reid
    x = next(iter(dm.test_dataloader()))[0]
    task.eval(), restored.eval()
    with torch.no_grad():
        assert torch.allclose(task.features(x), restored.features(x), atol=1e-6)  # BNNeck running stats came back


def test_metrics_need_the_whole_split(tmp_path):
    dm = digit_reid()
    prepare_data(dm, "vit_nano")
    task = build_task({"name": "vit_nano"}, dm, optim={"name": "adamw", "lr": 1e-3})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_test_batches=1)
    with pytest.raises(RuntimeError, match="whole split"):
        trainer.test(task, datamodule=dm, verbose=False)


def test_re_ranking_option_reranks_the_test_split_only():
    """reid.re_ranking (TransReID's TEST.RE_RANKING): test metrics from the re-ranked distances; the validation
    monitor keeps the plain ranking; bad values are named."""
    dm = digit_reid()
    prepare_data(dm, "vit_nano")
    opts = {"re_ranking": True, "re_ranking_k1": 20, "re_ranking_k2": 6, "re_ranking_lambda": 0.3}
    task = build_task({"name": "vit_nano"}, dm, reid=opts)
    f, pid = _clusters(300, ids=15, noise=1.2)
    is_query = torch.arange(300) < 60
    items = {"feats": f, "pids": pid, "camids": torch.arange(300) // 15 % 3, "is_query": is_query}
    fn = torch.nn.functional.normalize(f, dim=1)  # feat_norm
    args = (fn[is_query], fn[~is_query], pid[is_query], pid[~is_query], items["camids"][is_query],
            items["camids"][~is_query])
    want = retrieval_metrics(*args, distmat=re_ranking(fn[is_query], fn[~is_query], 20, 6, 0.3))
    got = task.retrieval(items, "test", None)
    assert got["map"] == pytest.approx(float(want["map"])) and got["rank1"] == pytest.approx(float(want["rank1"]))
    assert task.retrieval(items, "val", None)["map"] == pytest.approx(float(retrieval_metrics(*args)["map"]))
    assert got["map"] > task.retrieval(items, "val", None)["map"]
    for bad, message in (({"re_ranking": "yes"}, "reid.re_ranking='yes' has the wrong type"),
                         ({"re_ranking_k1": 0}, "reid.re_ranking_k1=0: give an integer >= 1"),
                         ({"re_ranking_lambda": 1.5}, r"reid.re_ranking_lambda=1.5: give a number in \[0, 1\]")):
        with pytest.raises(ConfigError, match=message):
            build_task({"name": "vit_nano"}, dm, reid=bad)


def test_options_and_models_that_cannot_do_reid_are_refused():
    dm = digit_reid(img_size=32)  # square: Sparsifiner's nano takes square inputs only
    prepare_data(dm, "vit_nano")
    with pytest.raises(ConfigError, match="unknown config key reid.margin"):
        build_task({"name": "vit_nano"}, dm, reid={"margin": 0.3})
    with pytest.raises(ConfigError, match="reid.neck_feat"):
        build_task({"name": "vit_nano"}, dm, reid={"neck_feat": "middle"})
    with pytest.raises(ConfigError, match="mixup"):
        build_task({"name": "vit_nano"}, dm, optim={"mixup_alpha": 0.8})
    with pytest.raises(ConfigError, match="no Re-ID mode"):  # an own objective on class logits only
        build_task({"name": "sparsifiner_deit_nano"}, dm)

    with pytest.raises(TaskMismatchError, match="Pick a classification model"):  # Re-ID trains classifiers
        prepare_data(digit_reid(), "fpn_tiny")

    from zoo.data import ClassificationDataModule

    digits = ClassificationDataModule(dataset="digits", img_size=32, batch_size=8)
    prepare_data(digits, "vit_nano")
    with pytest.raises(ConfigError, match="reid.. options are for Re-ID data"):
        build_task({"name": "vit_nano"}, digits, reid={"triplet_margin": 0.3})
