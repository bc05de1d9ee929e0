"""The benchmark's results: every value measured (`Samples`), turned into
one JSON document (`build`) and a short text for people (`summary`).

A value is keyed by workload, phase (``saturation``, ``rate_N``,
``kernel``), configuration, metric and repeat. The document gives, per
workload and phase, each configuration's min/median/max over repeats and
the paired comparisons: ratios (``probe/floor``...) and the latency added
by each configuration to the untraced one (``probe-none``...).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from bench.stats import paired_differences, paired_ratios, summarize
from bench.workloads import FLOOR, KERNEL, NONE, PROBE, SDK

RATIOS = ((FLOOR, NONE), (PROBE, NONE), (PROBE, FLOOR), (SDK, NONE))
RATIO_METRICS = ("rps", "p50_us", "p99_us")
LATENCY_METRICS = ("p50_us", "p99_us")


class Samples:
    """Every measured value, by (workload, phase, config, metric) and repeat."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str, str, str], dict[int, float]] = defaultdict(dict)

    def add(
        self, workload: str, phase: str, config: str, repeat: int, metrics: Mapping[str, float]
    ) -> None:
        for metric, value in metrics.items():
            self._values[workload, phase, config, metric][repeat] = value

    def series(self, workload: str, phase: str, config: str, metric: str) -> dict[int, float]:
        return dict(self._values.get((workload, phase, config, metric), {}))

    def workloads(self) -> list[str]:
        return list(dict.fromkeys(key[0] for key in self._values))

    def phases(self, workload: str) -> list[str]:
        return list(dict.fromkeys(key[1] for key in self._values if key[0] == workload))

    def configs(self, workload: str, phase: str) -> list[str]:
        return list(dict.fromkeys(key[2] for key in self._values if key[:2] == (workload, phase)))

    def metrics(self, workload: str, phase: str, config: str) -> list[str]:
        return [key[3] for key in self._values if key[:3] == (workload, phase, config)]


def _summaries(named: Iterable[tuple[str, Iterable[float]]]) -> dict[str, dict]:
    out = {}
    for name, values in named:
        summary = summarize(values)
        if summary is not None:
            out[name] = summary.as_dict()
    return out


def net_kernel_time(samples: Samples, workload: str) -> dict[int, float]:
    """The probe's kernel time per request less what the run-time statistics
    cost, by repeat. The kernel times each program run with two reads of its
    scheduler clock, a paravirtual clock here at about 50 ns a read, and the
    interval holds about one read's worth. The floor's programs return at
    once, so the floor's time per run is that cost (and a few nanoseconds of
    program), and every run of the probe's programs pays it too."""
    floor_per_run = paired_ratios(
        samples.series(workload, KERNEL, FLOOR, "kernel_ns_per_request"),
        samples.series(workload, KERNEL, FLOOR, "bpf_runs_per_request"),
    )
    probe_ns = samples.series(workload, KERNEL, PROBE, "kernel_ns_per_request")
    probe_runs = samples.series(workload, KERNEL, PROBE, "bpf_runs_per_request")
    return {
        repeat: probe_ns[repeat] - floor_per_run[repeat] * probe_runs[repeat]
        for repeat in sorted(probe_ns.keys() & probe_runs.keys() & floor_per_run.keys())
    }


def phase_report(samples: Samples, workload: str, phase: str) -> dict[str, dict]:
    configs = samples.configs(workload, phase)
    report: dict[str, dict] = {
        "configs": {
            config: _summaries(
                (metric, samples.series(workload, phase, config, metric).values())
                for metric in samples.metrics(workload, phase, config)
            )
            for config in configs
        }
    }
    if phase == KERNEL and PROBE in configs:
        report["configs"][PROBE] |= _summaries(
            (("kernel_net_ns_per_request", net_kernel_time(samples, workload).values()),)
        )
    pairs = [(a, b) for a, b in RATIOS if a in configs and b in configs]
    ratios = {
        f"{a}/{b}": _summaries(
            (
                metric,
                paired_ratios(
                    samples.series(workload, phase, a, metric),
                    samples.series(workload, phase, b, metric),
                ).values(),
            )
            for metric in RATIO_METRICS
        )
        for a, b in pairs
    }
    added = {
        f"{a}-{NONE}": _summaries(
            (
                metric,
                paired_differences(
                    samples.series(workload, phase, a, metric),
                    samples.series(workload, phase, NONE, metric),
                ).values(),
            )
            for metric in LATENCY_METRICS
        )
        for a, b in pairs
        if b == NONE
    }
    if any(ratios.values()):
        report["ratios"] = {name: values for name, values in ratios.items() if values}
    if any(added.values()):
        report["added_us"] = {name: values for name, values in added.items() if values}
    return report


def sdk_comparison(samples: Samples, workload: str, phase: str) -> dict[str, dict]:
    """Latency each of the probe and the in-process SDK adds per request to
    the untraced run, and the probe's share of the SDK's, paired by repeat."""
    out: dict[str, dict] = {}
    for metric in LATENCY_METRICS:
        none = samples.series(workload, phase, NONE, metric)
        probe_added = paired_differences(samples.series(workload, phase, PROBE, metric), none)
        sdk_added = paired_differences(samples.series(workload, phase, SDK, metric), none)
        share = paired_ratios(probe_added, sdk_added)
        out[metric] = _summaries(
            (("probe_added_us", probe_added.values()), ("sdk_added_us", sdk_added.values()))
            + ((("probe_share_of_sdk", share.values()),) if share else ())
        )
    return out


def build(
    samples: Samples,
    probe_figures: Mapping[str, Mapping[int, float]],
    meta: Mapping[str, object],
    profile: Mapping[str, object],
    sdk_phases: Mapping[str, str],
) -> dict[str, object]:
    """The JSON document. ``sdk_phases`` names, per workload measured with
    the SDK too, the fixed-rate phase the comparison is made on."""
    return {
        "meta": dict(meta),
        "workloads": {
            workload: {
                phase: phase_report(samples, workload, phase) for phase in samples.phases(workload)
            }
            for workload in samples.workloads()
        },
        "probe": _summaries((name, values.values()) for name, values in probe_figures.items()),
        "sdk_comparison": {
            workload: {"phase": phase, **sdk_comparison(samples, workload, phase)}
            for workload, phase in sdk_phases.items()
        },
        "profile": dict(profile),
    }


def median(report: Mapping, *path: str) -> float | None:
    """The median at ``path`` in a built document, None where not measured."""
    node: object = report
    for key in (*path, "median"):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return float(node)  # type: ignore[arg-type]


def _fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _fmt_summary(summary: Mapping | None, digits: int = 2) -> str:
    if not summary:
        return "-"
    low, mid, high = (f"{summary[key]:.{digits}f}" for key in ("min", "median", "max"))
    return f"{mid} [{low}-{high}]"


def _exchange_limit(rate: object, pressure_limit: object, export_queue: object = None) -> str:
    """The probe's exchange rate limit, and what lowers it (the CPU's pressure,
    the export's backlog, in documents that name them): its saturation
    figures depend on them."""
    if not isinstance(rate, int):
        return ""
    if rate == 0:
        return ", with no exchange rate limit"
    shortages = []
    if isinstance(pressure_limit, int | float) and pressure_limit > 0:
        shortages.append(
            f"the CPU is short (tasks waiting for one {pressure_limit:.0%}"
            " of the time, under a fifth of it idle)"
        )
    if isinstance(export_queue, int):
        shortages.append(f"the export's queue ({export_queue:,} spans) is three quarters full")
    lowered = f", fewer while {' or '.join(shortages)}" if shortages else ""
    return f", and sheds exchanges over {rate:,} a second{lowered} (see completeness at saturation)"


def summary(report: Mapping, targets: Iterable[Mapping]) -> str:
    """A few lines per workload, then the targets, for people."""
    lines = []
    meta = report["meta"]
    lines.append(
        f"probe benchmark ({'quick' if meta.get('quick') else 'full'}): "
        f"{meta.get('repeats')} repeat(s), {meta.get('seconds')} s per run, "
        f"{meta.get('cpus')} CPUs, kernel {meta.get('kernel')}; "
        "median [min-max] over repeats; the probe "
        + (
            "traces the load generator too"
            if meta.get("load_generator_traced")
            else "leaves the load generator untraced"
        )
        + _exchange_limit(
            meta.get("probe_exchange_rate"),
            meta.get("probe_cpu_pressure_limit"),
            meta.get("probe_export_queue"),
        )
    )
    for workload, phases in report["workloads"].items():
        lines.append(f"{workload}:")
        for phase, data in phases.items():
            configs = data["configs"]
            ratios = data.get("ratios", {})
            if phase == "saturation":
                rps = "  ".join(f"{c} {_fmt(median(configs, c, 'rps'), 1000, 1)}k" for c in configs)
                lines.append(f"  saturation req/s: {rps}")
                lines.append(
                    "    probe/floor "
                    + _fmt_summary(ratios.get("probe/floor", {}).get("rps"))
                    + "  floor/none "
                    + _fmt_summary(ratios.get("floor/none", {}).get("rps"))
                    + "  probe/none "
                    + _fmt_summary(ratios.get("probe/none", {}).get("rps"))
                )
            elif phase.startswith("rate_"):
                latency = "  ".join(
                    f"{c} {_fmt(median(configs, c, 'p50_us'))}/{_fmt(median(configs, c, 'p99_us'))}"
                    for c in configs
                )
                lines.append(f"  {phase[5:]}/s p50/p99 µs: {latency}")
                lines.append(
                    "    p99 probe/floor "
                    + _fmt_summary(ratios.get("probe/floor", {}).get("p99_us"))
                    + "  p99 floor/none "
                    + _fmt_summary(ratios.get("floor/none", {}).get("p99_us"))
                )
            if PROBE in configs and phase != KERNEL:
                probe = configs[PROBE]
                lines.append(
                    f"    probe: cpu {_fmt(median(probe, 'cpu_us_per_request'), digits=1)} µs/req"
                    f"  completeness {_fmt(median(probe, 'completeness'), digits=3)}"
                    f"  events lost {_fmt(median(probe, 'events_lost'))}"
                    f"  exchanges shed {_fmt(median(probe, 'exchanges_shed'))}"
                    f"  spans dropped {_fmt(median(probe, 'spans_dropped'))}"
                )
            if phase == KERNEL:
                kernel = "  ".join(
                    f"{c} {_fmt(median(configs, c, 'kernel_ns_per_request'))} ns/req"
                    f" ({_fmt(median(configs, c, 'bpf_runs_per_request'), digits=1)} runs)"
                    for c in configs
                )
                lines.append(f"  kernel time in BPF programs: {kernel}")
                net = median(configs, PROBE, "kernel_net_ns_per_request")
                if net is not None:
                    lines.append(
                        f"    probe net of the statistics' cost (floor's time per run): "
                        f"{_fmt(net)} ns/req"
                    )
    probe = report["probe"]
    lines.append(
        f"probe process: ready {_fmt_summary(probe.get('ready_s'))} s (the verifier "
        f"walked {_fmt_summary(probe.get('verified_instructions'), 0)} instructions), RSS steady "
        f"{_fmt_summary(probe.get('rss_steady_mb'), 1)} MB, peak "
        f"{_fmt_summary(probe.get('rss_peak_mb'), 1)} MB"
    )
    for workload, comparison in report["sdk_comparison"].items():
        for metric in LATENCY_METRICS:
            figures = comparison.get(metric, {})
            lines.append(
                f"{workload} {comparison['phase'][5:]}/s, {metric[:3]} added: probe "
                f"{_fmt_summary(figures.get('probe_added_us'), 0)} µs, SDK "
                f"{_fmt_summary(figures.get('sdk_added_us'), 0)} µs, probe/SDK "
                f"{_fmt_summary(figures.get('probe_share_of_sdk'))}"
            )
    profile = report["profile"]
    if profile.get("top_own"):
        lines.append(
            f"py-spy, probe under {profile.get('workload')} at {profile.get('rate')}/s "
            f"({profile.get('samples')} samples; the probe used "
            f"{profile.get('probe_cpu_cores', 0):.2f} cores):"
        )
        for entry in profile["top_own"][:5]:
            lines.append(f"  {entry['share']:6.1%}  {entry['frame']}")
        lines.append("  the probe's functions, with what they call:")
        for entry in profile.get("top_inclusive", [])[:10]:
            lines.append(f"  {entry['share']:6.1%}  {entry['frame']}")
    elif profile.get("skipped"):
        lines.append(f"py-spy: skipped ({profile['skipped']})")
    lines.append("targets (medians; never asserted):")
    for target in targets:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        measured = "-" if target["measured"] is None else f"{target['measured']:.3g}"
        lines.append(
            f"  [{verdict}] {target['target']} {target['limit']}: {target['where']} {measured}"
        )
    return "\n".join(lines)


__all__ = ["Samples", "build", "median", "summary"]
