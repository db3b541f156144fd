"""Pictures of `bench serve` results (matplotlib, PNG), one line per configuration:

    throughput_ttft.png   output tokens/s against TTFT p50 and p99
    throughput_tpot.png   output tokens/s against TPOT p50 and p99
    pareto.png            output tokens/s per user against output tokens/s per GPU, with
                          each configuration's Pareto front
    cdf.png               ITL and TTFT distributions, one line per (configuration, point)

`lines.json` beside them lists every drawn line (figure, label, number of points), so
tests and scripts can check a plot through its data rather than its pixels.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _by_config(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[r.get("config", "default")].append(r)
    for points in groups.values():  # in order of offered load: the sweep's order
        points.sort(key=_load)
    return dict(groups)


def _load(result: dict[str, Any]) -> float:
    if result.get("concurrency"):
        return float(result["concurrency"])
    rate = result.get("request_rate")
    if rate is not None:
        return float("inf") if rate == "inf" else float(rate)
    return result["output_throughput"]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (higher is better on both), by x."""
    front = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def per_user_rate(result: dict[str, Any]) -> float:
    """Output tokens/s one user sees: 1 / median TPOT."""
    tpot = result["tpot_s"]["median"]
    return 1.0 / tpot if tpot else 0.0


def draw(results: list[dict[str, Any]], out_dir: str, num_gpus: int = 1) -> dict[str, list]:
    """Write the four PNGs and lines.json into out_dir; returns what lines.json holds."""
    os.makedirs(out_dir, exist_ok=True)
    groups = _by_config(results)
    lines: dict[str, list] = defaultdict(list)

    def plot(ax, figure: str, xs: list, ys: list, label: str, **kw: Any) -> None:
        ax.plot(xs, ys, label=label, **kw)
        lines[figure].append({"label": label, "points": len(xs)})

    for metric, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, stat in zip(axes, ("median", "p99")):
            for config, points in groups.items():
                plot(ax, f"throughput_{name.lower()}",
                     [p["output_throughput"] for p in points],
                     [1000 * (p[metric][stat] or 0) for p in points],
                     f"{config} {stat}", marker="o")
            ax.set_xlabel("output throughput (tokens/s)")
            ax.set_ylabel(f"{name} {'p50' if stat == 'median' else stat} (ms)")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"Throughput against {name}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"throughput_{name.lower()}.png"), dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for config, points in groups.items():
        xy = [(p["output_throughput"] / num_gpus, per_user_rate(p)) for p in points]
        ax.scatter([x for x, _ in xy], [y for _, y in xy], alpha=0.5)
        front = pareto_front(xy)
        plot(ax, "pareto", [x for x, _ in front], [y for _, y in front], f"{config} front",
             marker="o")
    ax.set_xlabel("output tokens/s per GPU")
    ax.set_ylabel("output tokens/s per user (1 / TPOT p50)")
    ax.set_title("Per-user speed against per-GPU throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "pareto.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "itl_s", "ITL"), (axes[1], "ttft_s", "TTFT")):
        for config, points in groups.items():
            for p in points:
                values = sorted(v for r in p.get("requests", ()) for v in
                                (r[key] if key == "itl_s" else [r[key]]) if v is not None)
                if values:
                    plot(ax, f"cdf_{name.lower()}", [1000 * v for v in values],
                         [(i + 1) / len(values) for i in range(len(values))],
                         f"{config} {p.get('point', '')}".strip())
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of " + ("gaps" if key == "itl_s" else "requests"))
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency distributions")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cdf.png"), dpi=110)
    plt.close(fig)
    with open(os.path.join(out_dir, "lines.json"), "w") as f:
        json.dump(lines, f, indent=1)
    return dict(lines)
