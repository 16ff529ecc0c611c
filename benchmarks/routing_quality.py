"""End-to-end answer quality of every expert and of `model: auto` (a benchmark, not a test).

    .venv/bin/python benchmarks/routing_quality.py [--systems NAME ...] [--rerun NAME ...]
        [--r2r-thresholds T ...] [--concurrency 8] [--write-map]

Every system answers the project's checkable evaluation set (router/coe/data/quality.jsonl: six
categories, each item graded by a program: a number, unit tests run in a subprocess, accepted
answers, key facts, writing constraints) through the HTTP API with the official client, greedy.
Each expert is served alone (its default configuration); `auto` is served with the experts of the
map proposed here from the **dev** split; accuracy is reported on the **held-out** split, which
chooses nothing. Also per system: mean activated parameters per token and `cost_usd` per request
(from the responses' usage). The r2r expert is swept over ``--r2r-thresholds`` (the request field
`r2r_threshold`) and its default threshold is chosen from the sweep on the dev split.

Answers are cached in benchmarks/results/routing_quality.json per system and evaluation-set hash,
so a run only asks for the answers it does not have (``--rerun NAME`` or ``--fresh`` ask again). ``--write-map``
writes the proposal to assets/coe/map.json (+ map.png) and the chosen r2r threshold to
assets/r2r/router.json. Also writes benchmarks/results/routing_quality.png.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from openai import AsyncOpenAI
from speed import free_port, machine_info, serving, turnout_command  # benchmarks/ is on sys.path when run as a script
from tqdm import tqdm

from engine.zoo import ASSETS
from router.coe import CATEGORIES
from router.coe.checks import check
from router.coe.data import DATA
from router.coe.propose import Floor, ThresholdPoint, plot_map, propose_map, r2r_threshold_choice, scores_from_results

RESULTS = Path(__file__).resolve().parent / "results"
ITEMS = DATA / "quality.jsonl"
MAX_TOKENS = {"math": 96, "code": 192, "knowledge": 48, "writing": 160, "summarize": 128, "chat": 96}
EXPERTS = {  # the default configuration's experts, each served alone
    "smollm2-135m": {"name": "smollm2-135m", "model": "smollm2-135m-instruct"},
    "gemma3-270m": {"name": "gemma3-270m", "model": "gemma3-270m"},
    "smollm2-small": {"name": "smollm2-small", "model": "smollm2-small"},
    "r2r": {"name": "r2r", "r2r": {}},
}
# the single-model experts, whose reference answers are scored in bits per byte
BITS_PER_BYTE_MODELS = {name: expert["model"] for name, expert in EXPERTS.items() if "model" in expert}


def load_items() -> list[dict[str, Any]]:
    items = [json.loads(line) for line in ITEMS.read_text().splitlines() if line.strip()]
    for item in items:  # what is asked (the checks are applied afresh on every run)
        asked = {"messages": item["messages"], "max_tokens": MAX_TOKENS[item["category"]]}
        item["sha"] = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:16]
    return items


def serve_command(config: dict[str, Any], directory: Path, port: int) -> list[str]:
    path = directory / f"routing-quality-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return [
        *turnout_command(),
        "serve",
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]


async def ask(client: AsyncOpenAI, model: str, item: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    response = await client.chat.completions.create(
        model=model,
        messages=item["messages"],
        max_tokens=MAX_TOKENS[item["category"]],
        temperature=0.0,
        extra_body=extra or None,
    )
    usage = response.usage.model_dump() if response.usage else {}
    return {
        "id": item["id"],
        "reply": response.choices[0].message.content or "",
        "finish_reason": response.choices[0].finish_reason,
        "completion_tokens": usage.get("completion_tokens", 0),
        "activated_params_per_token": usage.get("activated_params_per_token"),
        "cost_usd": usage.get("cost_usd"),
        "decode_ms": usage.get("decode_ms"),
        "expert": response.model,
        "category_routed": (usage.get("route") or {}).get("category"),
        "large_fraction": (usage.get("r2r") or {}).get("large_fraction"),
        "r2r_threshold": (usage.get("r2r") or {}).get("threshold"),
    }


async def answer_all(
    url: str, model: str, items: list[dict[str, Any]], concurrency: int, extra: dict[str, Any], desc: str
) -> list[dict[str, Any]]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=1800, max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(items), desc=desc, unit="item")

    async def one(item: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            try:
                row = await ask(client, model, item, extra)
            except Exception as exc:  # one failed request is that item's wrong answer, not a lost run
                tqdm.write(f"{desc}: {item['id']}: {exc}")
                row = {"id": item["id"], "reply": "", "error": str(exc)[:300], "completion_tokens": 0}
                row.update(dict.fromkeys(("activated_params_per_token", "cost_usd", "decode_ms", "expert"), None))
                row.update(dict.fromkeys(("category_routed", "large_fraction", "r2r_threshold", "finish_reason"), None))
        bar.update()
        return row

    try:
        return list(await asyncio.gather(*(one(item) for item in items)))
    finally:
        bar.close()
        await client.close()


def grade(items: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Adds ``failed`` (the constraints missed) and ``correct`` to each row; code runs in parallel."""
    spec = {item["id"]: (item["check"], item["messages"][-1]["content"]) for item in items}
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = list(pool.map(lambda row: check(row["reply"], *spec[row["id"]]), rows))
    by_id = {item["id"]: item for item in items}
    for row, failed in zip(rows, failures):
        row["failed"], row["correct"] = failed, not failed
        row["category"], row["split"] = by_id[row["id"]]["category"], by_id[row["id"]]["split"]


def run_system(
    name: str,
    config: dict[str, Any],
    model: str,
    items: list[dict[str, Any]],
    args: argparse.Namespace,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="turnout-bench-") as directory,
        serving(serve_command(config, Path(directory), port), port) as url,
    ):
        return asyncio.run(answer_all(url, model, items, args.concurrency, extra or {}, name))


def summary(items: list[dict[str, Any]], rows: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """Per-category and mean accuracy on ``split``, mean activated parameters and cost per request."""
    by_id = {item["id"]: item for item in items}
    kept = [r for r in rows if by_id[r["id"]]["split"] == split]
    accuracy = {}
    for category in CATEGORIES:
        marks = [r["correct"] for r in kept if by_id[r["id"]]["category"] == category]
        accuracy[category] = sum(marks) / len(marks) if marks else 0.0
    mean = lambda key: sum(float(r[key] or 0) for r in kept) / max(len(kept), 1)  # noqa: E731
    tokens = sum(r["completion_tokens"] for r in kept)
    decode_s = sum(float(r["decode_ms"] or 0) for r in kept) / 1e3
    out = {
        "items": len(kept),
        "accuracy": accuracy,
        "mean_accuracy": sum(accuracy.values()) / len(accuracy),
        "activated_params_per_token": mean("activated_params_per_token"),
        "cost_usd_per_request": mean("cost_usd"),
        "completion_tokens_per_request": tokens / max(len(kept), 1),
        "decode_tokens_per_second_per_stream": tokens / decode_s if decode_s else None,
    }
    routed = [r["category_routed"] == by_id[r["id"]]["category"] for r in kept if r.get("category_routed")]
    if routed:  # auto: how often the classifier named the item's category
        out["routed_category_accuracy"] = sum(routed) / len(routed)
        out["served_by"] = dict(Counter(r["expert"] for r in kept))
    fractions = [r["large_fraction"] for r in kept if r["large_fraction"] is not None]
    if fractions:
        out["large_fraction"] = sum(fractions) / len(fractions)
    return out


def reference_bits(names: list[str]) -> dict[str, dict[str, float]]:
    """Each single-model expert's bits per byte of the reference answers (router/coe/data/eval.jsonl)."""
    from router.coe.data import load_examples
    from router.coe.propose import bits_per_byte

    examples = load_examples(DATA / "eval.jsonl")
    return {n: bits_per_byte(n, BITS_PER_BYTE_MODELS[n], examples) for n in names if n in BITS_PER_BYTE_MODELS}


def auto_config(body: dict[str, Any]) -> dict[str, Any]:
    """The experts the map and its fallback name, behind `auto` with exactly that map."""
    names = list(dict.fromkeys([body["fallback"], *body["categories"].values()]))
    return {
        "experts": [EXPERTS[n] for n in names],
        "router": {"coe": {"categories": body["categories"], "fallback": body["fallback"]}},
    }


def ask_system(
    results: dict[str, Any],
    key: str,
    entry: dict[str, Any],
    config: dict[str, Any],
    model: str,
    items: list[dict[str, Any]],
    args: argparse.Namespace,
    extra: dict[str, Any] | None = None,
) -> None:
    """Answers from ``key`` to every item, asking only for those not cached under the same item
    text and system ``entry`` (its kind, served configuration and token limits); stores them with
    their summary per split. Answers are saved as soon as they arrive, before grading."""
    entry = {**entry, "config": config, "request": extra or {}, "max_tokens": MAX_TOKENS}
    old = results["systems"].get(key, {})
    same = not args.fresh and key not in args.rerun and all(old.get(k) == v for k, v in entry.items())
    sha = {item["id"]: item["sha"] for item in items}
    cached = {r["id"]: r for r in old.get("rows", []) if same and r.get("item_sha") == sha.get(r["id"])}
    graded = set(cached)  # main regraded the cached answers with the current checks at its start
    todo = [item for item in items if item["id"] not in cached]
    if todo:
        for row in run_system(key, config, model, todo, args, extra):
            cached[row["id"]] = {**row, "item_sha": sha[row["id"]]}
    results["systems"][key] = {**entry, "rows": [cached[item["id"]] for item in items]}
    save(results)
    grade(items, [row for row in results["systems"][key]["rows"] if row["id"] not in graded])
    summarise(results["systems"][key], items)
    save(results)


def regrade(system: dict[str, Any], items: list[dict[str, Any]]) -> None:
    """Grade a system's answers with the current checks and summarise them per split it answered."""
    grade(items, system["rows"])
    summarise(system, items)


def summarise(system: dict[str, Any], items: list[dict[str, Any]]) -> None:
    answered = {row["id"] for row in system["rows"]}
    splits = sorted({item["split"] for item in items if item["id"] in answered})
    system["summary"] = {s: summary(items, system["rows"], s) for s in splits}


def r2r_sweep(results: dict[str, Any], items: list[dict[str, Any]], args: argparse.Namespace) -> None:
    dev = [i for i in items if i["split"] == "dev"]
    for threshold in args.r2r_thresholds:
        entry = {"kind": "r2r threshold", "threshold": threshold}
        ask_system(
            results,
            f"r2r@{threshold:g}",
            entry,
            {"experts": [EXPERTS["r2r"]]},
            "r2r",
            dev,
            args,
            {"r2r_threshold": threshold},
        )


def choose_r2r_threshold(results: dict[str, Any], floor_points: float) -> dict[str, Any]:
    """From the dev split: the sweep and r2r at its shipped threshold, against the large model alone."""
    systems = results["systems"]
    runs = [s for n, s in systems.items() if n == "r2r" or n.startswith("r2r@")]
    points = []
    for run in runs:
        dev = run["summary"]["dev"]
        threshold = run.get("threshold", run["rows"][0].get("r2r_threshold"))
        points.append(
            ThresholdPoint(
                float(threshold),
                dev["mean_accuracy"],
                dev.get("large_fraction", 1.0),
                dev["decode_tokens_per_second_per_stream"],
            )
        )
    return r2r_threshold_choice(points, systems["smollm2-135m"]["summary"]["dev"]["mean_accuracy"], floor_points)


def save(results: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "routing_quality.json").write_text(json.dumps(results, indent=1) + "\n")


def load_results() -> dict[str, Any]:
    path = RESULTS / "routing_quality.json"
    return json.loads(path.read_text()) if path.exists() else {"systems": {}}


def table(results: dict[str, Any], split: str) -> str:
    head = "| system | " + " | ".join(CATEGORIES) + " | mean | activated params/token | cost_usd/request |"
    lines = [head, "|---" + "|---:" * (len(CATEGORIES) + 3) + "|"]
    for name, system in results["systems"].items():
        s = system["summary"].get(split)
        if s is None:
            continue
        cells = " | ".join(f"{100 * s['accuracy'][c]:.0f}%" for c in CATEGORIES)
        lines.append(
            f"| {name} | {cells} | {100 * s['mean_accuracy']:.1f}% | {s['activated_params_per_token'] / 1e6:.1f}M "
            f"| {s['cost_usd_per_request']:.2e} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (front, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    systems = {n: s for n, s in results["systems"].items() if "test" in s["summary"]}
    for name, system in systems.items():
        s = system["summary"]["test"]
        front.plot(
            s["activated_params_per_token"] / 1e6,
            100 * s["mean_accuracy"],
            "*" if name == "auto" else "o",
            markersize=14 if name == "auto" else 9,
            label=name,
        )
    sweep = sorted((s["threshold"], s["summary"]["dev"]) for n, s in results["systems"].items() if n.startswith("r2r@"))
    if sweep:
        front.plot(
            [d["activated_params_per_token"] / 1e6 for _, d in sweep],
            [100 * d["mean_accuracy"] for _, d in sweep],
            "x--",
            color="grey",
            label="r2r thresholds (dev split)",
        )
    front.set_xlabel("mean activated parameters per token (millions)")
    front.set_ylabel("accuracy on the held-out items (%)")
    front.set_title("answer quality vs cost")
    front.legend(fontsize=8)
    width = 0.8 / max(len(systems), 1)
    for i, (name, system) in enumerate(systems.items()):
        acc = system["summary"]["test"]["accuracy"]
        bars.bar([j + i * width for j in range(len(CATEGORIES))], [100 * acc[c] for c in CATEGORIES], width, label=name)
    bars.set_xticks([j + 0.4 - width / 2 for j in range(len(CATEGORIES))], CATEGORIES)
    bars.set_ylabel("held-out accuracy (%)")
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="+", default=[*EXPERTS, "auto"], help="experts to ask, and auto")
    parser.add_argument("--rerun", nargs="*", default=[], help="systems to ask again although answers are cached")
    parser.add_argument("--r2r-thresholds", nargs="*", type=float, default=[0.02, 0.1, 0.3, 0.6])
    parser.add_argument("--fresh", action="store_true", help="ask every system again (no cached answers)")
    parser.add_argument("--concurrency", type=int, default=8)
    floor = Floor()
    parser.add_argument("--accuracy-floor", type=float, default=floor.accuracy_points, help="0.02: 2 points")
    parser.add_argument("--bits-floor", type=float, default=floor.bits_per_byte_ratio, help="relative (0.05: 5%%)")
    parser.add_argument("--noise-z", type=float, default=floor.noise_z, help="a category's lead: standard errors")
    parser.add_argument(
        "--write-map", action="store_true", help="ship the proposal: assets/coe/map.json, r2r's threshold"
    )
    args = parser.parse_args()

    items = load_items()
    results = load_results()
    results["machine"] = machine_info()
    for system in results["systems"].values():  # cached answers, with the current checks
        regrade(system, items)
    for name in [n for n in args.systems if n in EXPERTS]:
        ask_system(results, name, {"kind": "expert"}, {"experts": [EXPERTS[name]]}, name, items, args)
    bits = results.get("bits_per_byte", {})
    if set(bits) != set(BITS_PER_BYTE_MODELS) or not all(bits.values()) or "bpb" in args.rerun or args.fresh:
        results["bits_per_byte"] = reference_bits(list(EXPERTS))
        save(results)
    if "r2r" in args.systems:
        r2r_sweep(results, items, args)
        results["r2r_threshold"] = choose_r2r_threshold(results, args.accuracy_floor)
        save(results)

    floor = Floor(args.accuracy_floor, args.bits_floor, args.noise_z)
    body = propose_map(scores_from_results(results, "dev"), floor)
    results["map"] = body
    if "auto" in args.systems:
        entry = {"kind": "auto", "map": body["categories"], "fallback": body["fallback"]}
        ask_system(results, "auto", entry, auto_config(body), "auto", items, args)
    save(results)
    plot(results, RESULTS / "routing_quality.png")
    if args.write_map:
        ship(body, results)
    print(f"machine: {results['machine']}")
    print(f"\nheld-out split ({sum(i['split'] == 'test' for i in items)} items):\n" + table(results, "test"))
    print("\ndev split (chooses the map):\n" + table(results, "dev"))
    print(f"\nproposed map: {body['categories']}, fallback {body['fallback']}")
    if "r2r_threshold" in results:
        print(f"r2r threshold: {results['r2r_threshold']}")


def ship(body: dict[str, Any], results: dict[str, Any]) -> None:
    coe = ASSETS / "coe"
    (coe / "map.json").write_text(json.dumps(body, indent=2) + "\n")
    plot_map(body, coe / "map.png")
    choice = results.get("r2r_threshold")
    if choice is not None:
        path = ASSETS / "r2r" / "router.json"
        meta = json.loads(path.read_text())
        meta["served_threshold"] = choice["threshold"]
        meta["served_threshold_reason"] = choice["reason"]
        path.write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
