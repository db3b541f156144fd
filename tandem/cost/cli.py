"""`tandem cost RESULT.json...`: self-hosting against APIs, from measured serving results.

    tandem cost bench/results/sweep/*.json --gpu H200 --ttft-slo-ms 1000 --tpot-slo-ms 50 \\
        --tokens-per-month 3e9 --input-share 0.6 --cached-share 0.1 --peak-to-mean 2 \\
        --api gpt-4o-mini --api llama-3.1-8b-hosted --ops-usd-per-month 2000 --plot cost.png

Prints a table, then one JSON line (numbers, the operating point, the prices used with their
sources, the verdict). See model.py for the arithmetic and prices.py for the references.
"""

from __future__ import annotations

import argparse
import json
import sys

from tandem.bench.serve import load_result
from tandem.cost.model import (HOURS_PER_MONTH, Capacity, Signals, Traffic, api_monthly,
                               break_even_tokens, operating_point, self_hosted_monthly,
                               servers_needed)
from tandem.cost.prices import API_PRICES, GPU_PRICES, ApiPrice


def _api(text: str) -> tuple[str, ApiPrice]:
    """NAME (a reference) or NAME=IN,CACHED,OUT (USD per million tokens)."""
    name, _, prices = text.partition("=")
    if not prices:
        if name not in API_PRICES:
            raise argparse.ArgumentTypeError(f"unknown API {name!r}; known: "
                                             f"{sorted(API_PRICES)}, or NAME=IN,CACHED,OUT")
        return name, API_PRICES[name]
    try:
        i, c, o = (float(x) for x in prices.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--api {text!r}: want NAME=IN,CACHED,OUT") from e
    return name, ApiPrice(i, c, o, "given on the command line", "now")


def add_cost_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cost", help="build or buy: self-hosted cost from bench serve results "
                                    "against API prices")
    p.add_argument("results", nargs="+", help="bench serve --save-result / sweep point JSONs")
    p.add_argument("--gpu", default="H200", help=f"a reference price: {sorted(GPU_PRICES)}")
    p.add_argument("--gpu-price", type=float, default=None, help="USD per GPU-hour (overrides)")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per server in the results")
    p.add_argument("--utilization", type=float, default=0.7,
                   help="most of a server's measured capacity you plan to use (headroom)")
    volume = p.add_mutually_exclusive_group(required=True)
    volume.add_argument("--tokens-per-month", type=float)
    volume.add_argument("--requests-per-day", type=float,
                        help="with --tokens-per-request (input + output)")
    p.add_argument("--tokens-per-request", type=float, default=1000.0)
    p.add_argument("--input-share", type=float, default=0.6, help="uncached input, of all")
    p.add_argument("--cached-share", type=float, default=0.1, help="cached input, of all")
    p.add_argument("--peak-to-mean", type=float, default=2.0)
    p.add_argument("--api", type=_api, action="append", default=None,
                   help="NAME or NAME=IN,CACHED,OUT per million tokens (repeatable; default: "
                        "every reference)")
    p.add_argument("--ops-usd-per-month", type=float, default=0.0,
                   help="engineering and operations cost of running it yourself")
    p.add_argument("--ttft-slo-ms", type=float, default=None, help="p90 TTFT target")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="p90 TPOT target")
    p.add_argument("--api-ttft-ms", type=float, default=None, help="what the API offers")
    p.add_argument("--api-tpot-ms", type=float, default=None)
    p.add_argument("--spend-threshold", type=float, default=10000.0,
                   help="USD per month from which the API bill is a meaningful line")
    p.add_argument("--reliability-target", type=float, default=None, help="uptime %% you need")
    p.add_argument("--vendor-sla", type=float, default=None, help="the API's uptime SLA %%")
    p.add_argument("--data-must-stay-on-prem", action="store_true")
    p.add_argument("--plot", default=None, help="PNG: monthly cost against volume")
    p.set_defaults(func=run_cost)


def run_cost(args: argparse.Namespace) -> int:
    results = [load_result(path) for path in args.results]
    ttft = args.ttft_slo_ms / 1000 if args.ttft_slo_ms is not None else None
    tpot = args.tpot_slo_ms / 1000 if args.tpot_slo_ms is not None else None
    point, how = operating_point(results, ttft, tpot)
    gpu_price = args.gpu_price if args.gpu_price is not None else GPU_PRICES[args.gpu] \
        .usd_per_gpu_hour
    cap = Capacity(point["total_token_throughput"], point["output_throughput"], args.num_gpus,
                   gpu_price)
    volume = (args.tokens_per_month if args.tokens_per_month is not None
              else args.requests_per_day * args.tokens_per_request * 365 / 12)
    traffic = Traffic(volume, args.input_share, args.cached_share, args.peak_to_mean)
    apis = args.api or list(API_PRICES.items())
    self_cost = self_hosted_monthly(traffic, cap, args.utilization, args.ops_usd_per_month)
    rows = []
    for name, price in apis:
        prices = (price.input_usd_per_m, price.cached_input_usd_per_m, price.output_usd_per_m)
        rows.append({"api": name, **{k: v for k, v in zip(
            ("input_usd_per_m", "cached_input_usd_per_m", "output_usd_per_m"), prices)},
            "source": price.source, "as_of": price.as_of,
            "api_usd_per_month": api_monthly(traffic, *prices),
            "break_even_tokens_per_month": break_even_tokens(
                traffic, cap, args.utilization, args.ops_usd_per_month, prices)})
    latency = None
    if args.api_ttft_ms is not None or args.api_tpot_ms is not None:
        latency = bool((args.ttft_slo_ms is not None and args.api_ttft_ms is not None
                        and args.ttft_slo_ms < args.api_ttft_ms)
                       or (args.tpot_slo_ms is not None and args.api_tpot_ms is not None
                           and args.tpot_slo_ms < args.api_tpot_ms))
    reliability = (None if args.reliability_target is None or args.vendor_sla is None
                   else args.reliability_target > args.vendor_sla)
    for r in rows:  # a verdict against each API; the first one listed is the headline
        signals = Signals(r["api_usd_per_month"] >= args.spend_threshold, latency,
                          reliability, args.data_must_stay_on_prem)
        r["spend_is_material"] = signals.spend_is_material
        r["verdict"] = signals.verdict(self_cost < r["api_usd_per_month"])
    verdict = f"against {rows[0]['api']}: {rows[0]['verdict']}"
    record = {
        "benchmark": "cost", "operating_point": {
            "how": how, "config": point.get("config"), "point": point.get("point"),
            "output_tokens_per_s": cap.output_tokens_per_s,
            "total_tokens_per_s": cap.total_tokens_per_s,
            "ttft_p90_s": point["ttft_s"]["p90"], "tpot_p90_s": point["tpot_s"]["p90"],
            "device": point.get("device")},
        "gpu": {"name": args.gpu, "usd_per_gpu_hour": gpu_price, "num_gpus": args.num_gpus,
                "source": "given on the command line" if args.gpu_price is not None
                else GPU_PRICES[args.gpu].source},
        "self_hosted_usd_per_m_output": cap.usd_per_m_output(),
        "self_hosted_usd_per_m_input": cap.usd_per_m_input(),
        "self_hosted_usd_per_m_tokens": cap.usd_per_m_tokens(),
        "traffic": {"tokens_per_month": volume, "input_share": args.input_share,
                    "cached_share": args.cached_share, "peak_to_mean": args.peak_to_mean},
        "servers": servers_needed(traffic, cap, args.utilization),
        "self_hosted_usd_per_month": self_cost, "apis": rows,
        "signals": {"latency_beats_api": signals.latency_beats_api,
                    "reliability_beats_sla": signals.reliability_beats_sla,
                    "must_stay_on_prem": signals.must_stay_on_prem},
        "verdict": verdict, "command": " ".join(["tandem"] + sys.argv[1:])}
    print(f"operating point: {how}: {cap.output_tokens_per_s:.0f} output tok/s "
          f"({cap.total_tokens_per_s:.0f} total) on {args.num_gpus} x {args.gpu} at "
          f"${gpu_price:.2f}/GPU-hour")
    print(f"self-hosted: ${cap.usd_per_m_output():.4f} per 1M output tokens, or "
          f"${cap.usd_per_m_input():.4f} per 1M input tokens (each carrying the whole GPU "
          f"cost), ${cap.usd_per_m_tokens():.4f} per 1M tokens of the benchmark mix; "
          f"{record['servers']} server(s), ${self_cost:,.0f}/month for "
          f"{volume:.3g} tokens/month")
    for r in rows:
        be = r["break_even_tokens_per_month"]
        print(f"  {r['api']:<22} ${r['api_usd_per_month']:>12,.0f}/month   break-even "
              f"{'never' if be is None else f'{be:.3g} tokens/month'}   "
              f"({r['source']}, {r['as_of']})\n  {'':<22} {r['verdict']}")
    print(f"verdict: {verdict}")
    if args.plot:
        _plot(args.plot, traffic, cap, args.utilization, args.ops_usd_per_month, rows)
        record["plot"] = args.plot
    print(json.dumps(record))
    return 0


def _plot(path: str, traffic: Traffic, cap: Capacity, utilization: float, ops: float,
          rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max([traffic.tokens_per_month * 10] + [r["break_even_tokens_per_month"] * 3
                                                 for r in rows if r["break_even_tokens_per_month"]])
    volumes = [top * 10 ** (k / 50 - 4) for k in range(201)]  # four decades, log-spaced

    def at(v: float) -> Traffic:
        return Traffic(v, traffic.input_share, traffic.cached_share, traffic.peak_to_mean)

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(volumes, [self_hosted_monthly(at(v), cap, utilization, ops) for v in volumes],
            label=f"self-hosted ({cap.num_gpus} GPU(s) per server)", drawstyle="steps-post")
    for r in rows:
        prices = (r["input_usd_per_m"], r["cached_input_usd_per_m"], r["output_usd_per_m"])
        ax.plot(volumes, [api_monthly(at(v), *prices) for v in volumes], label=r["api"])
        if r["break_even_tokens_per_month"]:
            be = r["break_even_tokens_per_month"]
            ax.axvline(be, linestyle=":", alpha=0.6)
            ax.annotate(f"{r['api']}: {be:.2g}", (be, api_monthly(at(be), *prices)),
                        fontsize=7, rotation=90, va="bottom")
    ax.axvline(traffic.tokens_per_month, color="black", alpha=0.4, label="your volume")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per month")
    ax.set_ylabel(f"USD per month ({HOURS_PER_MONTH:.0f} h)")
    ax.set_title("Monthly cost against volume (break-even marked)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
