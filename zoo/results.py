"""``python -m zoo results DIR``: every run under DIR (a Hydra multirun folder, or any tree of runs) in one table.

A run is a folder with the ``config.yaml`` train.py writes (or Hydra's ``.hydra/config.yaml`` if it stopped
before that); its metrics are its ``metrics.json``. The columns are the config keys whose values differ
between runs (flattened, dotted) and the metrics. A run without ``metrics.json`` stays in the table with
its status (running: a live process holds its folder lock; else crashed or unfinished).
Writes ``results.md``, ``results.csv`` and ``results.png`` (the metric against a swept number, one line
per seed and per value of the other swept keys). Runs that differ only by seed are one group: ``summary.md`` /
``summary.csv`` hold each group's mean +- sample standard deviation over its seeds. The groups are the swept
command-line overrides other than the seed (``experiment=...`` in a sweep of recipes x seeds), read from each
run's ``.hydra/overrides.yaml``; runs without them are grouped by their differing config keys.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ZooError
from .runlock import RunDirInUseError, check_run_dir_free
from .weights import atomic_write

log = logging.getLogger("zoo.results")

MONITORS = ("test/acc", "test/miou", "test/auroc")  # the tasks' own metrics, the default to plot
IGNORED = ("paths.",)  # differs in every run by construction


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "done"
    overrides: dict[str, str] | None = None  # the run's command-line overrides (Hydra's overrides.yaml)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, f"{key}.") if isinstance(v, dict) and v else {key: v})
    return out


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        log.warning("cannot read %s (%s); the run is listed without its config", path, e)
        return {}


def _read_overrides(path: Path) -> dict[str, str] | None:
    """``["experiment=a", "+x.y=1"]`` -> ``{"experiment": "a", "x.y": "1"}``; None without the file."""
    if not path.is_file():
        return None
    items = _read_yaml(path)
    items = items if isinstance(items, list) else []
    return dict((k.lstrip("+~"), v) for k, _, v in (str(i).partition("=") for i in items))


def _status(run_dir: Path) -> str:
    try:
        check_run_dir_free(run_dir)
    except RunDirInUseError:
        return "running"
    return "no metrics.json (crashed or unfinished)"


def collect(root: str | Path) -> list[Run]:
    """Every run under ``root`` (recursively), in natural path order (``2_...`` before ``10_...``)."""
    root = Path(root)
    if not root.is_dir():
        raise ZooError(f"{root} is not a folder; give the run or multirun folder (e.g. multirun/train/DATE)")
    dirs = {p.parent for p in root.rglob("config.yaml") if ".hydra" not in p.parent.parts}
    dirs |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    runs = []
    for d in sorted(dirs, key=_natural):
        cfg = d / "config.yaml" if (d / "config.yaml").is_file() else d / ".hydra" / "config.yaml"
        run = Run(d, flatten(_read_yaml(cfg)), overrides=_read_overrides(d / ".hydra" / "overrides.yaml"))
        try:
            run.metrics = {k: (math.nan if v is None else float(v)) for k, v in json.loads((d / "metrics.json").read_text()).items()}
        except FileNotFoundError:
            run.status = _status(d)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            run.status = f"unreadable metrics.json ({type(e).__name__})"
        runs.append(run)
    if not runs:
        raise ZooError(f"no runs under {root}: no config.yaml or .hydra/config.yaml in it or its subfolders")
    return runs


def swept_keys(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between runs; a key that only repeats another's values with the same
    leaf name (``data.seed`` = ``seed``) is left out."""
    keys = sorted({k for r in runs for k in r.config if not k.startswith(IGNORED)})
    values = {k: [json.dumps(r.config.get(k), default=str) for r in runs] for k in keys}
    differ = [k for k in keys if len(set(values[k])) > 1 and not _in_own_folder(runs, k)]
    differ.sort(key=lambda k: (k.count("."), k))  # shorter keys first: they win over their copies
    kept: list[str] = []
    for k in differ:
        if not any(values[k] == values[o] and k.split(".")[-1] == o.split(".")[-1] for o in kept):
            kept.append(k)
    return sorted(kept)


def _in_own_folder(runs: list[Run], key: str) -> bool:
    """A path inside each run's own folder (a checkpoint dirpath, a logger's save_dir): not a swept value."""
    return all(isinstance(r.config.get(key), str) and str(r.path) in r.config[key] for r in runs)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def table(runs: list[Run], root: Path, metrics: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: run, the swept keys, the metrics (``metrics`` or all of them), status."""
    keys = swept_keys(runs)
    names = metrics or sorted({k for r in runs for k in r.metrics})
    header = ["run", *keys, *names, "status"]
    rows = [[str(r.path.relative_to(root)) if r.path != root else ".", *(_cell(r.config.get(k)) for k in keys),
             *(_cell(r.metrics.get(m)) for m in names), r.status] for r in runs]
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)]) + "\n"


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def pick_x(runs: list[Run], keys: list[str], x: str | None) -> str | None:
    """``x`` if given (it must be a swept number), else the first swept numeric key that is not a seed."""
    numeric = [k for k in keys if all(_number(r.config.get(k)) is not None for r in runs)]
    if x is not None:
        if x not in numeric:
            raise ZooError(f"--x {x}: not a swept numeric key of these runs; swept numeric keys: {', '.join(numeric) or 'none'}")
        return x
    return next((k for k in numeric if k.split(".")[-1] != "seed"), None)


def pick_metric(runs: list[Run], metric: str | None) -> str:
    names = sorted({k for r in runs for k in r.metrics})
    if metric is not None:
        if metric not in names:
            raise ZooError(f"--metric {metric}: no run has it; the runs' metrics: {', '.join(names) or 'none (no metrics.json)'}")
        return metric
    return next((m for m in MONITORS if m in names), names[0] if names else "")


def log_x(xs: list[float]) -> bool:
    """A log axis for lr-like values: all positive and more than 10x apart."""
    return min(xs) > 0 and max(xs) / min(xs) > 10


def plot(runs: list[Run], x: str, metric: str, keys: list[str], out: Path) -> Path:
    """``metric`` against ``x``, one line per value of the other swept keys (seed among them)."""
    from matplotlib.figure import Figure

    from .plots import save

    others = [k for k in keys if k != x]
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        if metric in r.metrics:
            label = ", ".join(f"{k}={_cell(r.config.get(k))}" for k in others) or metric
            lines.setdefault(label, []).append((float(r.config[x]), r.metrics[metric]))
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for label, pts in lines.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, "o-", label=label)
    xs = [float(r.config[x]) for r in runs]
    if log_x(xs):
        ax.set_xscale("log")
    if len(set(xs)) <= 10:  # the swept values themselves as ticks (matplotlib's run into each other)
        ax.set_xticks(sorted(set(xs)), [f"{v:g}" for v in sorted(set(xs))])
        ax.minorticks_off()
    ax.set(xlabel=x, ylabel=metric, title=f"{metric} vs {x}")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize="small")
    return save(fig, out)


def _is_seed(key: str) -> bool:
    return key.split(".")[-1] == "seed"


def group_keys(runs: list[Run]) -> list[str]:
    """What tells the groups of seeds apart: the swept command-line overrides but the seed (Hydra's
    overrides.yaml), or, for runs without them, the swept config keys but the seed."""
    if all(r.overrides is not None for r in runs):
        keys = sorted({k for r in runs for k in r.overrides})
        return [k for k in keys if not _is_seed(k) and len({r.overrides.get(k) for r in runs}) > 1]
    return [k for k in swept_keys(runs) if not _is_seed(k)]


def _group_value(run: Run, key: str) -> str:
    if run.overrides is not None and key in run.overrides:
        return run.overrides[key]
    return _cell(run.config.get(key))


def summary(runs: list[Run], metrics: list[str] | None = None) -> tuple[list[str], list[str], list[tuple]]:
    """The groups of runs that differ only by seed (first-seen order): ``(keys, metric names, rows)``, a row being
    ``(key values, runs with metrics, runs, {metric: (mean, sample std or None)})``."""
    keys = group_keys(runs)
    names = metrics or sorted({k for r in runs for k in r.metrics})
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(_group_value(r, k) for k in keys), []).append(r)
    rows = []
    for values, members in groups.items():
        done = [r for r in members if r.metrics]
        stats = {}
        for m in names:
            xs = [r.metrics[m] for r in done if m in r.metrics and not math.isnan(r.metrics[m])]
            if xs:
                mean = sum(xs) / len(xs)
                stats[m] = (mean, math.sqrt(sum((v - mean) ** 2 for v in xs) / (len(xs) - 1)) if len(xs) > 1 else None)
        rows.append((values, len(done), len(members), stats))
    return keys, names, rows


def summary_table(keys: list[str], names: list[str], rows: list[tuple], csv_form: bool = False):
    """Header and cells: ``mean ± std`` per metric (Markdown), or a mean and a ``_std`` column each (CSV)."""
    def cells(stats):
        if csv_form:
            return [c for m in names for c in ((f"{stats[m][0]:.6g}", "" if stats[m][1] is None else f"{stats[m][1]:.6g}")
                                              if m in stats else ("", ""))]
        return [(f"{stats[m][0]:.4f}" + ("" if stats[m][1] is None else f" ± {stats[m][1]:.4f}")) if m in stats else ""
                for m in names]

    head = [*(keys or ["runs"]), "n", *([c for m in names for c in (m, f"{m}_std")] if csv_form else names)]
    return head, [[*(values if keys else ("all",)), f"{done}/{total}", *cells(stats)] for values, done, total, stats in rows]


def results(root: str | Path, metric: str | None = None, x: str | None = None, out: str | Path | None = None,
            metrics: list[str] | None = None) -> dict:
    """Collect, write ``results.md`` / ``results.csv`` / ``results.png`` into ``out`` (default ``root``), and
    ``summary.md`` / ``summary.csv`` (mean ± std over seeds of ``metrics``, default all) when seeds repeat."""
    root = Path(root)
    runs = collect(root)
    if metrics:
        known = sorted({k for r in runs for k in r.metrics})
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise ZooError(f"--metrics {','.join(unknown)}: no run has it; the runs' metrics: {', '.join(known) or 'none'}")
    metric = pick_metric(runs, metric)
    keys = swept_keys(runs)
    x = pick_x(runs, keys, x)
    out = Path(out) if out is not None else root
    header, rows = table(runs, root)
    written = [out / "results.csv", out / "results.md"]

    def write_csv(path: Path, head: list[str], body: list[list[str]]) -> None:
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                csv.writer(f).writerows([head, *body])

        atomic_write(path, write, what=path.name)

    write_csv(written[0], header, rows)
    atomic_write(written[1], lambda tmp: tmp.write_text(markdown(header, rows)), what="results.md")
    groups = summary(runs, metrics)
    if len(groups[2]) < len(runs):  # some group holds several seeds
        write_csv(out / "summary.csv", *summary_table(*groups, csv_form=True))
        atomic_write(out / "summary.md", lambda tmp: tmp.write_text(markdown(*summary_table(*groups))), what="summary.md")
        written += [out / "summary.csv", out / "summary.md"]
    if x is not None and metric and any(metric in r.metrics for r in runs):
        written.append(plot(runs, x, metric, keys, out / "results.png"))
    else:
        log.info("no plot: %s", "no swept numeric key" if x is None else f"no run has {metric}")
    return {"runs": runs, "keys": keys, "metric": metric, "x": x, "files": written, "summary": groups}
