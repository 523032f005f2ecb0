"""The MIL baselines (CLAM-SB, TransMIL, DSMIL, DTFD-MIL) beside ABMIL / ACMIL on one batched-bag contract:
padded batches equal their bags one at a time, padding changes nothing, their own objectives backpropagate,
official checkpoint layouts load, and the pieces that differ from the official code behave as documented."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo
from zoo.contract import capabilities
from zoo.models.clam import smooth_top1_svm
from zoo.models.dtfd import pseudo_bag_ids

BASELINES = ["clam_sb", "transmil", "dsmil", "dtfd"]
MIL = zoo.list_models(task="mil")
# small sizes (the defaults are the papers' 512-d heads); TransMIL's dim must be a multiple of its 8 heads
SMALL = {"clam_sb": dict(hidden_dim=24, attn_dim=12), "transmil": dict(dim=32), "dsmil": dict(q_dim=12),
         "dtfd": dict(dim=24, attn_dim=12), "acmil": dict(inner_dim=12, attn_dim=12), "abmil": dict(inner_dim=12)}


LOSSES = {"abmil": {"slide_ce"}, "acmil": {"slide_ce", "branch_ce", "diversity"}, "clam_sb": {"bag_ce", "instance"},
          "dsmil": {"bag_ce", "max_ce"}, "dtfd": {"tier1_ce", "tier2_ce"}}


def _net(name, num_classes=3, **kw):
    torch.manual_seed(0)
    kw = {"in_dim": 16, **SMALL[name], **kw}
    return zoo.create_model(name, num_classes=num_classes, **kw)


def _padded(lengths, dim=16, shape=None):
    torch.manual_seed(1)
    n = max(lengths)
    x = torch.randn(len(lengths), n, *(shape or (dim,)))
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    return x, mask


def test_registry_lists_the_baselines_as_mil_with_their_papers_training_defaults():
    assert set(BASELINES) | {"abmil", "acmil"} <= set(MIL)
    for name in BASELINES:
        spec = zoo.get_spec(name)
        assert spec.task == "mil" and spec.paper_ids and spec.source
        d = spec.train_defaults
        assert d is not None and d.source and d.lr < 1e-3 and d.label_smoothing == 0.0
        assert zoo.model_info(name)["train_defaults"].startswith(f"name={d.name}")


@pytest.mark.parametrize("name", MIL)
@pytest.mark.parametrize("images", [False, True], ids=["features", "images"])
def test_padded_batch_equals_bags_one_at_a_time_and_ignores_padding(name, images):
    lengths = [7, 3, 5] if not images else [3, 1]
    net = _net(name, **({"in_dim": None, "in_chans": 1} if images else {})).eval()
    x, mask = _padded(lengths, shape=(1, 28, 28) if images else None)
    with torch.no_grad():
        batch = net(x, mask)
        alone = torch.cat([net(x[b:b + 1, :n]) for b, n in enumerate(lengths)])
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
        garbage = x.clone()
        garbage[~mask] = 1e3 * torch.randn_like(garbage[~mask])  # padded rows: anything at all
        torch.testing.assert_close(net(garbage, mask), batch, atol=0, rtol=0)
        w = net.attention_weights(x, mask)
        assert w.shape[0] == len(lengths) and w.shape[-1] == x.shape[1]
        assert (w[~mask[:, None].expand_as(w)] == 0).all()  # nothing on padding
        maps = net.attention_maps(x, mask)
        assert all(m.shape[:1] == (len(lengths),) and m.ndim == 4 for m in maps.values())


@pytest.mark.parametrize("name", [n for n in MIL if capabilities(zoo.create_model(n, in_dim=4)).own_objective])
def test_own_objectives_are_finite_and_backpropagate(name):
    net = _net(name).train()
    x, mask = _padded([9, 4, 6])
    y = torch.tensor([0, 1, 2])
    logits, losses = net.forward_train(x, y, mask=mask)
    assert logits.shape == (3, 3) and set(losses) == LOSSES[name]
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # padded rows get no gradient from the objective: the losses do not see them
    x = x.clone().requires_grad_()
    _, losses = _net(name).train().forward_train(x, y, mask=mask)
    sum(losses.values()).backward()
    assert (x.grad[~mask] == 0).all() and x.grad[mask].abs().sum() > 0


def test_transmil_has_no_objective_of_its_own_and_checks_its_width():
    assert not capabilities(_net("transmil")).own_objective
    with pytest.raises(zoo.ZooError, match="multiple of heads"):
        zoo.create_model("transmil", in_dim=8, dim=20)


# ------------------------------------------------------------------------------------------- CLAM-SB
def test_smooth_top1_svm_smooth_and_hard_branches():
    # margin 2 < log 1000: tau * logsumexp([0, 0 + 1 - 2]) = log(1 + e^-1)
    assert smooth_top1_svm(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(np.log1p(np.exp(-1)))
    # margin 10 >= log 1000: the hard loss max(0, 0 + 1 - 10) = 0; and a wrong top class costs its margin + 1
    assert smooth_top1_svm(torch.tensor([[10.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(0.0)
    assert smooth_top1_svm(torch.tensor([[10.0, 0.0]]), torch.tensor([1])).item() == pytest.approx(11.0)


def test_clam_instance_loss_on_small_bags_uses_disjoint_halves():
    net = _net("clam_sb", num_classes=2).train()
    seen = []
    orig = net._instance_loss

    def spy(raw, h, y):
        seen.append(raw.shape[0])
        return orig(raw, h, y)

    net._instance_loss = spy
    x, mask = _padded([5, 1, 20])
    _, losses = net.forward_train(x, torch.tensor([1, 0, 1]), mask=mask)
    assert seen == [5, 20]  # the one-instance bag has no pairs to cluster; the others only their real instances
    assert torch.isfinite(losses["instance"]) and losses["instance"] > 0
    assert net.subtyping is False and _net("clam_sb", num_classes=3).subtyping is True


def test_clam_official_checkpoint_layout_loads(tmp_path):
    src = _net("clam_sb", num_classes=2)
    official = {k.replace("attention_net.3.", "attention_net.module.3.").replace("attention_net.0.", "attention_net.module.0."): v
                for k, v in src.state_dict().items()}
    official["instance_loss_fn.labels"] = torch.arange(2)  # the SVM loss's buffer, in official checkpoints
    torch.save(official, tmp_path / "s_0_checkpoint.pt")
    net = zoo.create_model("clam_sb", num_classes=2, in_dim=16, **SMALL["clam_sb"],
                           pretrained_file=str(tmp_path / "s_0_checkpoint.pt")).eval()
    x, mask = _padded([6, 4])
    torch.testing.assert_close(net(x, mask), src.eval()(x, mask))


# ------------------------------------------------------------------------------------------- DTFD-MIL
def test_pseudo_bags_are_array_splits_of_each_bags_real_instances():
    valid = torch.arange(14)[None] < torch.tensor([14, 9, 3, 1])[:, None]
    for random in (True, False):
        part = pseudo_bag_ids(valid, 4, random=random)
        assert (part[~valid] == -1).all()
        for b, n in enumerate([14, 9, 3, 1]):
            sizes = sorted(np.bincount(part[b, :n].numpy(), minlength=4).tolist(), reverse=True)
            assert sizes == sorted((len(c) for c in np.array_split(np.arange(n), 4)), reverse=True)
    assert pseudo_bag_ids(valid, 4, random=False)[0, :8].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # eval: interleaved


def test_dtfd_official_checkpoint_layout_loads(tmp_path):
    """The official Main_DTFD_MIL.py saves a dict of the four modules' state dicts (its resume file adds the epoch
    and both optimisers' states)."""
    src = _net("dtfd", num_classes=2).eval()
    parts = {"classifier": {}, "dim_reduction": {}, "attention": {}, "att_classifier": {}}
    for k, v in src.state_dict().items():
        part, key = k.split(".", 1)
        parts[part][key] = v
    opt = torch.optim.Adam(src.parameters())
    torch.save({"epoch": 3, "optimizer_adam0": opt.state_dict(), **parts}, tmp_path / "DTFD_for_resume.pth")
    net = zoo.create_model("dtfd", num_classes=2, in_dim=16, **SMALL["dtfd"],
                           pretrained_file=str(tmp_path / "DTFD_for_resume.pth")).eval()
    x, mask = _padded([6, 4])
    torch.testing.assert_close(net(x, mask), src(x, mask))
    torch.save({"attention": parts["attention"]}, tmp_path / "partial.pth")  # a part missing: an error naming keys
    with pytest.raises(Exception, match="classifier"):
        zoo.create_model("dtfd", num_classes=2, in_dim=16, **SMALL["dtfd"], pretrained_file=str(tmp_path / "partial.pth"))


@pytest.mark.parametrize("distill", ["afs", "maxmins", "maxs"])
def test_dtfd_tier_two_trains_on_its_own_loss_only(distill):
    net = _net("dtfd", num_classes=2, distill=distill).train()
    x, mask = _padded([9, 5])
    _, losses = net.forward_train(x, torch.tensor([0, 1]), mask=mask)
    losses["tier2_ce"].backward()  # the official second optimiser: tier 2's parameters only
    tier1 = [p for n, p in net.named_parameters() if not n.startswith("att_classifier.")]
    assert all(p.grad is None for p in tier1)
    assert all(p.grad is not None for p in net.att_classifier.parameters())


# ------------------------------------------------------------------------------------------- the comparison
METRICS = ["test/auroc", "test/acc", "test/balanced_acc", "test/f1"]


def _fake_sweep(root, experiments, seeds):
    """Run folders as ``train.py -m experiment=A,B seed=...`` writes them: config.yaml, .hydra/overrides.yaml,
    metrics.json (the last run of the last experiment unfinished)."""
    import json

    import yaml

    rng, values, i = np.random.default_rng(0), {}, 0
    for e in experiments:
        for s in seeds:
            run = root / f"{i}_experiment={e},seed={s}"
            (run / ".hydra").mkdir(parents=True)
            model = e.split("_digit_bags")[0]
            (run / "config.yaml").write_text(yaml.safe_dump({"task_name": e, "seed": s, "model": {"name": model},
                                                             "data": {"seed": s, "batch_size": 8}}))
            (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"experiment={e}", f"seed={s}"]))
            if not (e == experiments[-1] and s == seeds[-1]):
                m = {k: float(rng.uniform(0.8, 1.0)) for k in METRICS} | {"test/loss": 0.3}
                (run / "metrics.json").write_text(json.dumps(m))
                values.setdefault(e, []).append(m)
            i += 1
    return values


def test_results_command_gives_mean_and_std_over_seeds_per_experiment(tmp_path, capsys):
    import csv
    import statistics

    from zoo.__main__ import main

    exps = ["abmil_digit_bags", "clam_sb_digit_bags", "dtfd_digit_bags"]
    values = _fake_sweep(tmp_path / "sweep", exps, [1, 2, 3])
    assert main(["results", str(tmp_path / "sweep"), "--out", str(tmp_path), "--metrics", ",".join(METRICS)]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == "| experiment | n | " + " | ".join(METRICS) + " |"
    with (tmp_path / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["experiment"] for r in rows] == exps and [r["n"] for r in rows] == ["3/3", "3/3", "2/3"]
    for row, e in zip(rows, exps):
        for m in METRICS:
            xs = [v[m] for v in values[e]]
            assert float(row[m]) == pytest.approx(statistics.mean(xs), rel=1e-5)
            assert float(row[f"{m}_std"]) == pytest.approx(statistics.stdev(xs), rel=1e-5)
        cell = f"{statistics.mean(v['test/auroc'] for v in values[e]):.4f} ± "
        assert any(line.startswith(f"| {e} |") and cell in line for line in md)
    assert "mean ± sample std over seeds" in printed and "dtfd_digit_bags" in printed
    assert main(["results", str(tmp_path / "sweep"), "--out", str(tmp_path), "--metrics", "test/nope"]) == 2
