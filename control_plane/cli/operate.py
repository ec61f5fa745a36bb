"""Operator commands over REST: push, enroll-token, rollout, agents, models."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from control_plane.catalog.push import PushError, push_bundle
from control_plane.cli import diagnose
from control_plane.cli.common import CliError, add_client_options, api_call, client_settings
from control_plane.errors import Invalid
from control_plane.fleet.config import parse_assignment, set_values
from control_plane.rollout.spec import parse_stages_text
from protocol.exceptions import InvalidMessage
from protocol.labels import parse_labels
from protocol.timeutil import parse_time


def register(sub: argparse._SubParsersAction) -> None:
    """Add the operator commands."""
    p = sub.add_parser("push", help="upload a bundle to the control plane")
    p.add_argument("bundle", type=Path)
    add_client_options(p)
    p.set_defaults(func=cmd_push)

    et = sub.add_parser("enroll-token", help="enrollment tokens")
    etsub = et.add_subparsers(dest="et_command", required=True)
    c = etsub.add_parser("create", help="create a token and print it")
    c.add_argument("--labels", default="", help="labels granted to agents, k=v,k2=v2")
    c.add_argument("--max-uses", type=int, default=1)
    c.add_argument("--ttl", type=float, default=24 * 3600, help="seconds until it expires")
    c.add_argument(
        "--require-approval",
        action="store_true",
        help="agents enrolled with it wait until `modelfleet agents approve`",
    )
    c.add_argument(
        "--lock-labels",
        action="store_true",
        help="the labels it grants cannot be changed by `modelfleet agents relabel`",
    )
    add_client_options(c)
    c.set_defaults(func=cmd_enroll_token_create)

    r = sub.add_parser("rollout", help="staged rollouts")
    rsub = r.add_subparsers(dest="rollout_command", required=True)
    rc = rsub.add_parser("create", help="roll a version out in stages; prints the rollout id")
    rc.add_argument("--model", required=True)
    rc.add_argument("--version", required=True)
    rc.add_argument(
        "--selector", default="", help="site=onprem,hw in (cpu,gpu),!legacy (empty: every agent)"
    )
    rc.add_argument(
        "--stages",
        default="100%",
        help="e.g. 1%%:10m,10%%:30m,100%% (a bare number is a count of agents)",
    )
    rc.add_argument("--max-error-rate", type=float)
    rc.add_argument("--max-p95-latency-ms", type=float)
    rc.add_argument("--max-p95-latency-ratio", type=float)
    rc.add_argument("--min-requests", type=int)
    rc.add_argument(
        "--max-failed-agents",
        help="a count, or N%% of the moved agents (default 10%%; 100%% tolerates any number)",
    )
    rc.add_argument(
        "--max-drift",
        type=float,
        dest="max_drift",
        help="max mean absolute output drift (with --shadow)",
    )
    rc.add_argument("--on-failure", choices=("rollback", "pause"), default="rollback")
    rc.add_argument("--max-agents-per-minute", type=int)
    rc.add_argument("--deadline", help="RFC 3339 time by which it must complete")
    rc.add_argument(
        "--max-stall",
        help="end it by --on-failure when a stage's gates wait this long with no new traffic "
        "on the version (default 30m; 'off' never)",
    )
    rc.add_argument("--maintenance-window", help="cron, UTC: '* 22-23,0-4 * * 1-5'")
    rc.add_argument(
        "--shadow",
        action="store_true",
        help="moved agents also score a sample of requests with the old version",
    )
    rc.add_argument("--shadow-sample", type=float)
    rc.add_argument(
        "--no-join-later",
        action="store_true",
        help="agents that enroll after it completes do not get it",
    )
    rc.add_argument("--supersedes", metavar="ID", help="replace an active rollout")
    rc.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a configuration rollout: this layer applies where the rollout does (repeatable)",
    )
    rc.add_argument(
        "--rollback",
        action="store_true",
        help="allow agents to go down to this version (they refuse a lower one otherwise)",
    )
    add_client_options(rc)
    rc.set_defaults(func=cmd_rollout_create)
    rl = rsub.add_parser("list", help="rollouts, newest first")
    add_client_options(rl)
    rl.set_defaults(func=cmd_rollout_list)
    for name, text in (
        ("status", "show a rollout"),
        ("pause", "stop moving agents"),
        ("resume", "carry on (the stage soaks again)"),
        ("promote", "skip the current stage's soak and gates"),
        ("abort", "stop it and move agents back (--no-rollback keeps them)"),
    ):
        c = rsub.add_parser(name, help=text)
        c.add_argument("id")
        if name == "abort":
            c.add_argument("--no-rollback", action="store_true")
        add_client_options(c)
        c.set_defaults(
            func=cmd_rollout_status if name == "status" else cmd_rollout_command, action=name
        )

    rep = sub.add_parser("report", help="where does a model run best")
    repsub = rep.add_subparsers(dest="report_command", required=True)
    rc2 = repsub.add_parser("compare", help="groups by site (or label, agent, version)")
    rc2.add_argument("--model", required=True)
    rc2.add_argument("--version", help="one or more versions, comma separated")
    rc2.add_argument("--by", default="site", help="site, a label key, agent, version, or two")
    rc2.add_argument("--since", help="window ending now (1h)")
    rc2.add_argument("--from", dest="from_", help="window start, RFC 3339")
    rc2.add_argument("--to", help="window end, RFC 3339")
    rc2.add_argument("--format", choices=("table", "json", "csv"), default="table")
    add_client_options(rc2)
    rc2.set_defaults(func=cmd_report_compare)

    fl = sub.add_parser("fleet", help="agents by site and state, versions, active rollouts")
    add_client_options(fl)
    fl.set_defaults(func=cmd_fleet)

    a = sub.add_parser("agents", help="agents")
    asub = a.add_subparsers(dest="agents_command", required=True)
    al = asub.add_parser("list", help="table of agents and their models")
    al.add_argument("--selector", help="only agents this label selector matches")
    add_client_options(al)
    al.set_defaults(func=cmd_agents_list)
    ap = asub.add_parser("approve", help="let in an agent that waits for approval")
    ap.add_argument("id")
    add_client_options(ap)
    ap.set_defaults(func=cmd_agents_approve)
    rl = asub.add_parser("relabel", help="set and remove an agent's labels (audited)")
    rl.add_argument("id")
    rl.add_argument("--set", action="append", default=[], metavar="K=V", help="set a label")
    rl.add_argument("--remove", action="append", default=[], metavar="K", help="remove a label")
    add_client_options(rl)
    rl.set_defaults(func=cmd_agents_relabel)
    ar = asub.add_parser("revoke", help="cut an agent off at once (HTTP and MQTT)")
    ar.add_argument("id")
    add_client_options(ar)
    ar.set_defaults(func=cmd_agents_revoke)
    diagnose.register(asub)

    m = sub.add_parser("models", help="models")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="models and versions")
    add_client_options(ml)
    ml.set_defaults(func=cmd_models_list)


def _print(args: argparse.Namespace, body: Any, text: str) -> None:
    print(json.dumps(body, indent=2) if args.json else text)


def cmd_push(args: argparse.Namespace) -> int:
    """Upload a bundle: only the blobs the control plane lacks, then its manifest."""
    server, token = client_settings(args)
    try:
        out = asyncio.run(push_bundle(server, token, args.bundle))
    except PushError as exc:
        raise CliError(str(exc), 1) from None
    body = out.body
    what = "pushed" if out.status == 201 else "already present"
    _print(
        args,
        body,
        f"{what}: {body['name']} {body['version']} ({body['manifestDigest']}); sent "
        f"{out.sent_files} file(s), {out.sent_bytes} bytes; {out.held_files} already held",
    )
    return 0


def cmd_enroll_token_create(args: argparse.Namespace) -> int:
    """Create an enrollment token and print it."""
    try:
        labels = parse_labels(args.labels)
    except InvalidMessage as exc:
        raise CliError(f"--labels: {exc}") from None
    body = {
        "labels": labels,
        "maxUses": args.max_uses,
        "ttlSeconds": args.ttl,
        "requireApproval": args.require_approval,
        "lockLabels": args.lock_labels,
    }
    _, out = asyncio.run(api_call(args, "POST", "/enrollment-tokens", json_body=body))
    _print(args, out, out["token"])
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def _ago(ts: str | None) -> str:
    if not ts:
        return "never"
    secs = (datetime.now(UTC) - parse_time(ts, "lastSeen")).total_seconds()
    return f"{secs:.0f}s ago" if secs < 120 else f"{secs / 60:.0f}m ago"


def format_agents(agents: list[dict[str, Any]]) -> str:
    """The fleet table."""
    rows = []
    for a in agents:
        labels = ",".join(f"{k}={v}" for k, v in sorted(a["labels"].items())) or "-"
        models = (
            ", ".join(f"{m['name']} {m['version']} {m['state']}" for m in a.get("models", []))
            or "-"
        )
        seen = _ago(a.get("lastSeen")) + ("" if a.get("online") else " (offline)")
        rows.append([a["id"][:8], a["name"], labels, seen, models])
    return _table(rows, ["ID", "NAME", "LABELS", "LAST SEEN", "MODELS"])


def cmd_agents_approve(args: argparse.Namespace) -> int:
    """Approve a pending agent."""
    _, out = asyncio.run(api_call(args, "POST", f"/agents/{args.id}/approve", json_body={}))
    _print(args, out, f"agent {args.id} approved")
    return 0


def cmd_agents_relabel(args: argparse.Namespace) -> int:
    """Set and remove an agent's labels."""
    try:
        to_set = parse_labels(",".join(args.set))
    except InvalidMessage as exc:
        raise CliError(f"--set: {exc}") from None
    body = {"set": to_set, "remove": args.remove}
    _, out = asyncio.run(api_call(args, "POST", f"/agents/{args.id}/labels", json_body=body))
    labels = ",".join(f"{k}={v}" for k, v in sorted(out["labels"].items())) or "-"
    moved = " (new desired state)" if out["desiredChanged"] else ""
    _print(args, out, f"agent {args.id}: {labels}{moved}")
    return 0


def cmd_agents_revoke(args: argparse.Namespace) -> int:
    """Revoke an agent."""
    _, out = asyncio.run(api_call(args, "POST", f"/agents/{args.id}/revoke", json_body={}))
    text = (
        f"agent {args.id} revoked: regenerate the broker's password file "
        "(modelfleet mqtt passwd) and SIGHUP mosquitto to refuse its MQTT login too"
    )
    _print(args, out, text)
    return 0


def cmd_agents_list(args: argparse.Namespace) -> int:
    """Print the fleet table."""
    query = f"?{urlencode({'selector': args.selector})}" if args.selector else ""
    _, body = asyncio.run(api_call(args, "GET", f"/agents{query}"))
    _print(args, body, format_agents(body["agents"]))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """Print models."""
    _, body = asyncio.run(api_call(args, "GET", "/models"))
    rows = [[m["name"], str(m["versions"]), m["latest"] or "-"] for m in body["models"]]
    _print(args, body, _table(rows, ["MODEL", "VERSIONS", "LATEST"]))
    return 0


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def format_rollout(r: dict[str, Any]) -> str:
    """A readable view of one rollout: stages with progress bars, gates, timeline, agents."""
    p = r["progress"]
    lines = [
        f"rollout {r['id']}  {r['model']} {r['version']}  state: {r['state'].upper()}",
        f"  selector: {r['selector'] or '(every agent)'}   matching {p['matching']}, "
        f"moved {p['moved']}, active {p['active']}",
        "  stages:",
    ]
    for i, st in enumerate(r["stages"], 1):
        size = f"{st['percent']:g}%" if "percent" in st else f"{st['count']} agents"
        soak = f" soak {st['soak']}" if st.get("soak") else ""
        lines.append(
            f"    {i}. {size:>11}{soak:<12} {_bar(st['moved'], st['target'])}  {st['status']}"
        )
        for g in st.get("gates") or []:
            mark = {"pass": "ok", "fail": "FAIL", "wait": "wait"}[g["outcome"]]
            note = f"  ({g['note']})" if g.get("note") else ""
            lines.append(f"         {mark:>4} {g['gate']}: {g['value']} vs {g['threshold']}{note}")
    lines += _limits_lines(r)
    if r["timeline"]:
        lines.append("  timeline:")
        for e in r["timeline"]:
            lines.append(f"    {e['at'][11:19]} {e['kind']:<12} {e['reason']}")
    if r["targets"]:
        lines.append("  agents:")
        for t in r["targets"]:
            reason = f"  ({t['reason']})" if t.get("reason") else ""
            lines.append(
                f"    {t['agentId'][:8]} {t['name'] or '':<14} {t['site'] or '-':<8} "
                f"stage {t['stage']}: {t['state']}{reason}"
            )
    return "\n".join(lines)


def _limits_lines(r: dict[str, Any]) -> list[str]:
    """The gates in force (defaults marked), the stall bound, and what the rollout waits on."""
    lines = []
    gates = r.get("effectiveGates") or {}
    if gates:
        shown = []
        for name, g in gates.items():
            default = " (default)" if g.get("default") else ""
            shown.append(f"{name} {g['value']}{default}")
        lines.append("  gates: " + ", ".join(shown))
    if "failedAgents" in r:
        lines.append(f"  failed or refused: {r['failedAgents']} of {r['progress']['moved']} moved")
    if r.get("maxStall"):
        default = " (default)" if r["maxStall"].get("default") else ""
        lines.append(f"  max stall: {r['maxStall']['value']}{default}")
    w = r.get("waiting")
    if w:
        since = f" since {w['since'][11:19]}" if w.get("since") else ""
        lines.append(f"  waiting on {w['on']}{since}: {w['reason']}")
        if w.get("failsAt"):
            on_failure = (r.get("spec") or {}).get("on_failure", "rollback")
            lines.append(f"    no progress by {w['failsAt'][11:19]} ends it ({on_failure})")
    return lines


def cmd_rollout_create(args: argparse.Namespace) -> int:
    """Create a rollout and print its id."""
    try:
        stages = parse_stages_text(args.stages)
    except InvalidMessage as exc:
        raise CliError(f"--stages: {exc}") from None
    gates: dict[str, Any] = {}
    for flag, key in (
        ("max_error_rate", "max_error_rate"),
        ("max_p95_latency_ms", "max_p95_latency_ms"),
        ("max_p95_latency_ratio", "max_p95_latency_ratio"),
        ("min_requests", "min_requests"),
        ("max_drift", "max_mean_abs_output_drift"),
    ):
        if getattr(args, flag) is not None:
            gates[key] = getattr(args, flag)
    if args.max_failed_agents is not None:
        v = args.max_failed_agents
        gates["max_failed_agents"] = v if v.endswith("%") else _int(v, "--max-failed-agents")
    body: dict[str, Any] = {
        "model": args.model,
        "version": args.version,
        "selector": args.selector,
        "stages": stages,
        "gates": gates,
        "on_failure": args.on_failure,
        "rollback": args.rollback,
        "shadow": args.shadow,
        "join_later": not args.no_join_later,
    }
    for flag, key in (
        ("max_agents_per_minute", "max_agents_per_minute"),
        ("deadline", "deadline"),
        ("max_stall", "max_stall"),
        ("maintenance_window", "maintenance_window"),
        ("shadow_sample", "shadow_sample"),
        ("supersedes", "supersedes"),
    ):
        if getattr(args, flag) is not None:
            body[key] = getattr(args, flag)
    if args.config:
        try:
            body["config"] = set_values({}, dict(parse_assignment(a) for a in args.config))
        except (ValueError, Invalid) as exc:
            raise CliError(f"--config: {exc}") from None
    _, out = asyncio.run(api_call(args, "POST", "/rollouts", json_body=body))
    _print(args, out, out["id"])
    return 0


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CliError(f"{flag}: {text!r} is not a count or N%") from None


def cmd_rollout_status(args: argparse.Namespace) -> int:
    """Show a rollout."""
    _, out = asyncio.run(api_call(args, "GET", f"/rollouts/{args.id}"))
    _print(args, out, format_rollout(out))
    return 0


def cmd_rollout_list(args: argparse.Namespace) -> int:
    """List rollouts."""
    _, out = asyncio.run(api_call(args, "GET", "/rollouts"))
    rows = [
        [
            r["id"][:8],
            r["model"],
            r["version"],
            r["state"],
            f"{r['stage']}/{r['stages']}",
            r["createdAt"],
        ]
        for r in out["rollouts"]
    ]
    _print(args, out, _table(rows, ["ID", "MODEL", "VERSION", "STATE", "STAGE", "CREATED"]))
    return 0


def cmd_rollout_command(args: argparse.Namespace) -> int:
    """pause, resume, promote or abort."""
    body = {"rollback": not getattr(args, "no_rollback", False)}
    _, out = asyncio.run(
        api_call(args, "POST", f"/rollouts/{args.id}/{args.action}", json_body=body)
    )
    _print(args, out, f"rollout {out['id']}: {out['state']}")
    return 0


REPORT_COLUMNS = [
    "requests",
    "errors",
    "error_rate",
    "throughput_rps",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "cost_per_million",
    "agents",
]


def _report_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for g in report["groups"]:
        lat = g["latency_ms"]
        values = [
            g["requests"],
            g["errors"],
            g["error_rate"],
            g["throughput_rps"],
            lat["p50"],
            lat["p95"],
            lat["p99"],
            g["cost_per_million"],
            g["agents"],
        ]
        key = ",".join(f"{k}={v}" for k, v in g["key"].items())
        rows.append(
            [
                key,
                *(
                    "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
                    for v in values
                ),
            ]
        )
    return rows


def format_report(report: dict[str, Any], fmt: str) -> str:
    """The comparison as a table, CSV or JSON."""
    if fmt == "json":
        return json.dumps(report, indent=2)
    header = ["group", *REPORT_COLUMNS]
    rows = _report_rows(report)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue().rstrip("\n")
    w = report["window"]
    return "\n".join(
        [
            f"{report['model']} {', '.join(report['versions'])}  by {','.join(report['by'])}  "
            f"{w['from']} .. {w['to']}",
            _table(rows, header),
            f"verdict: {report['verdict']['summary']}",
        ]
    )


def cmd_report_compare(args: argparse.Namespace) -> int:
    """Print the comparison report."""
    query = {"model": args.model, "by": args.by}
    for key, value in (
        ("version", args.version),
        ("since", args.since),
        ("from", args.from_),
        ("to", args.to),
    ):
        if value:
            query[key] = value
    _, out = asyncio.run(api_call(args, "GET", f"/reports/compare?{urlencode(query)}"))
    print(format_report(out, "json" if args.json else args.format))
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    """Print the fleet overview."""
    _, out = asyncio.run(api_call(args, "GET", "/fleet"))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    lines = [f"{out['agents']} agents"]
    for site, states in out["sites"].items():
        lines.append(f"  site {site}: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    for model, versions in out["models"].items():
        lines.append(f"  {model}: " + ", ".join(f"{v} on {n}" for v, n in sorted(versions.items())))
    for r in out["rollouts"]:
        lines.append(
            f"  rollout {r['id'][:8]} {r['model']} {r['version']}: {r['state']} "
            f"stage {r['stage']}/{r['stages']}"
        )
    print("\n".join(lines))
    return 0
