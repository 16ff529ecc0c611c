"""``turnout``: serve, and manage the model cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import Settings


def _distill(args: argparse.Namespace) -> int:
    from engine import zoo
    from engine.distill.train import DistillConfig, distill

    cfg = DistillConfig(keep_layers=args.keep_layers, steps=args.steps, minutes=args.minutes, seed=args.seed)
    teacher = zoo.pull("smollm2-135m-instruct")
    work = zoo.cache_root() / "distill" / f"smollm2-small-{cfg.keep_layers}l-seed{cfg.seed}"
    out = distill(teacher, work, args.out, cfg)
    print(f"wrote {out} (checkpoints in {work})")
    return 0


def _train_draft_head(args: argparse.Namespace) -> int:
    from engine import zoo
    from engine.model.quantized import DEFAULT_GROUP_SIZE
    from engine.speculative.head_train import HeadTrainConfig, train_draft_head

    cfg = HeadTrainConfig(
        k_vocab=args.k_vocab,
        steps=args.steps,
        minutes=args.minutes,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    quantization = args.quantization  # the served target's group size names the work files (the features differ)
    if quantization != "none":
        quantization += f"-g{DEFAULT_GROUP_SIZE[quantization]}"
    work = zoo.cache_root() / "draft-head" / f"{args.model}-{quantization}-seed{cfg.seed}"
    out = args.out or zoo.ASSETS / "draft-heads" / f"{args.model}.pt"
    print(f"wrote {train_draft_head(args.model, args.quantization, work, out, cfg)} (work files in {work})")
    return 0


def _train_coe(args: argparse.Namespace) -> int:
    from engine.zoo import ASSETS
    from router.coe.classifier import TrainConfig
    from router.coe.data import DATA
    from router.coe.train import train_coe

    args.data = args.data or DATA / "prompts.jsonl"
    args.out = args.out or ASSETS / "coe"
    if not args.propose_map_only:
        result = train_coe(args.data, args.out, TrainConfig(epochs=args.epochs, seed=args.seed), args.target_accuracy)
        accuracy, last_only = result["accuracy"], result["last_message_only_accuracy"]
        print(f"held-out accuracy {accuracy:.1%} (last message only: {last_only:.1%})")
        print(f"calibrated min_confidence {result['min_confidence']} (routed accuracy >= {args.target_accuracy:.0%})")
        print(f"wrote {args.out}/head.safetensors, head.json and confusion.png")
    if args.propose_map or args.propose_map_only:
        from router.coe.propose import Floor, propose_from_results

        flags = {
            "accuracy_points": args.accuracy_floor,
            "bits_per_byte_ratio": args.bits_floor,
            "noise_z": args.noise_z,
        }
        floor = Floor(**{k: v for k, v in flags.items() if v is not None})
        body = propose_from_results(args.scores, floor, args.cost_budget, args.out)
        print(
            f"proposed map: {body['categories']}, fallback {body['fallback']} (wrote {args.out}/map.json and map.png)"
        )
        cost = body["mean_activated_params_per_token"] / 1e6
        print(f"mean accuracy {body['mean_accuracy']:.1%} at {cost:.1f}M activated parameters per token")
        if "accuracy_given_up" in body:
            given = ", ".join(f"{c} {100 * v:.1f}" for c, v in body["accuracy_given_up"].items() if v)
            lost = 100 * body["mean_accuracy_given_up"]
            print(f"the cost budget gives up {lost:.1f} points of mean accuracy ({given or 'none'})")
    return 0


def _train_r2r(args: argparse.Namespace) -> int:
    from engine import zoo
    from router.r2r.train import R2RConfig, train_r2r

    cfg = R2RConfig(
        prompts=args.prompts,
        max_tokens=args.max_tokens,
        window=args.window,
        tau=args.tau,
        mode=args.mode,
        target=args.target,
        seed=args.seed,
    )
    out = args.out or zoo.ASSETS / "r2r"
    result = train_r2r(zoo.cache_root() / "r2r", out, cfg)
    held = result["held_out"]
    print(f"held-out: {held} (entropy baseline: {result['entropy_baseline']})")
    print(f"wrote {out}/router.safetensors, router.json and curve.png (work files in {zoo.cache_root() / 'r2r'})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.config import load_settings
    from server.request_id import configure_logging, uvicorn_log_config
    from server.transport import uvicorn_options

    overrides = {
        "host": args.host,
        "port": args.port,
        "model": args.model,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "activations": args.activations,
        "speculative_draft": args.speculative_draft,
        "num_draft_tokens": args.num_draft_tokens,
        "max_batch_size": args.max_batch_size,
        "max_model_len": args.max_model_len,
        "kv_policy": args.kv_policy,
        "kv_budget_tokens": args.kv_budget_tokens,
        "kv_heavy_ratio": args.kv_heavy_ratio,
        "kv_recent_ratio": args.kv_recent_ratio,
        "kv_sinks": args.kv_sinks,
        "kv_memory_mb": args.kv_memory_mb,
        "kv_dtype": args.kv_dtype,
        "kv_page_size": args.kv_page_size,
    }
    settings = load_settings(args.config, overrides)
    configure_logging(args.log_level)  # each line names its request's x-request-id
    _fetch_models(settings)  # before binding the port, with progress bars; a typo fails here
    server: uvicorn.Server | None = None

    def load_failed(message: str) -> None:  # a configuration that cannot load: exit, as vLLM does
        print(f"turnout: loading the experts failed: {message}", file=sys.stderr)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_error=load_failed)
    options = {**uvicorn_options(settings.server), "log_config": uvicorn_log_config(), "log_level": args.log_level}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    server.run()
    return 1 if app.state.turnout.load_error is not None else 0


def _fetch_models(settings: Settings) -> None:
    """Every embedded expert's models (its own, a draft model, R2R's pair) pulled and converted, and
    the router's embedder fetched: a misspelt name or a missing file stops `turnout serve` here."""
    from engine.factory import draft_head_file, resolve_model_path

    for expert in settings.experts:
        if expert.engine != "embedded":
            continue
        names = [expert.r2r.small, expert.r2r.large] if expert.r2r else [expert.model]
        spec = expert.speculative
        if spec is not None and spec.draft == "head":
            head = draft_head_file(expert.model, spec.engine_config())
            if not head.is_file():
                raise FileNotFoundError(f"expert {expert.name!r}: no draft head at {head} (turnout train-draft-head)")
        elif spec is not None and spec.draft != "ngram":
            names.append(spec.draft)
        for name in names:
            resolve_model_path(name)
        if expert.r2r is not None and not (expert.r2r.router / "router.json").is_file():
            raise FileNotFoundError(f"expert {expert.name!r}: no R2R router at {expert.r2r.router} (router.json)")
    if settings.router.coe is not None:
        from router.coe.embedder import fetch

        fetch()


def _pull(args: argparse.Namespace) -> int:
    from engine import zoo

    for name in args.names or list(zoo.ZOO):
        path = zoo.pull(name)
        print(f"{name}: ready at {path}")
    return 0


def _list(_: argparse.Namespace) -> int:
    from engine import zoo

    print(f"cache: {zoo.cache_root()}")
    print(f"{'name':<26}{'cached':<10}{'size':>10}  source")
    for entry, converted, size in zoo.cached_models():
        status = "yes" if converted else "no"
        print(f"{entry.name:<26}{status:<10}{size / 1e6:>8.0f}MB  PyPI {entry.wheel}=={entry.version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnout", description="OpenAI-compatible LLM serving gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the configured experts over HTTP")
    serve.add_argument(
        "--config",
        type=Path,
        default=None,
        help="turnout.yaml (default: every zoo expert, and model auto routing between them)",
    )
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--model", default=None, help="model of the first expert: zoo name, .gguf or directory")
    serve.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--quantization", default=None, choices=["none", "int4", "nf4"])
    serve.add_argument(
        "--activations", default=None, choices=["int8", "float"], help="decode activations of a quantized model"
    )
    serve.add_argument(
        "--speculative-draft",
        default=None,
        help="drafter of the first expert: ngram, head (its shipped draft head), a draft model (zoo name or "
        "path, same tokenizer) or none",
    )
    serve.add_argument("--num-draft-tokens", type=int, default=None, help="most tokens drafted per step")
    serve.add_argument("--max-batch-size", type=int, default=None)
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--kv-policy", default=None, choices=["full", "h2o"], help="KV cache of the first expert")
    serve.add_argument("--kv-budget-tokens", type=int, default=None, help="h2o: KV entries kept per sequence")
    serve.add_argument("--kv-heavy-ratio", type=float, default=None, help="h2o: heavy hitters, share of length")
    serve.add_argument("--kv-recent-ratio", type=float, default=None, help="h2o: recent window, share of length")
    serve.add_argument("--kv-sinks", type=int, default=None, help="h2o: first positions never evicted")
    serve.add_argument("--kv-memory-mb", type=float, default=None, help="KV pool size: MiB of pages")
    serve.add_argument("--kv-dtype", default=None, choices=["auto", "bfloat16", "float32"], help="cached keys/values")
    serve.add_argument("--kv-page-size", type=int, default=None, help="tokens per KV page (a power of two)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)

    distill = sub.add_parser("distill", help="build smollm2-small from smollm2-135m-instruct (resumable)")
    distill.add_argument("--out", type=Path, default=Path("assets/smollm2-small"), help="where its weights go")
    distill.add_argument("--keep-layers", type=int, default=6)
    distill.add_argument("--steps", type=int, default=400)
    distill.add_argument("--minutes", type=float, default=60.0, help="stop after this much training time")
    distill.add_argument("--seed", type=int, default=0)
    distill.set_defaults(func=_distill)

    head = sub.add_parser("train-draft-head", help="train the EAGLE-style draft head for a model (resumable)")
    head.add_argument("--model", default="smollm2-135m-instruct")
    head.add_argument("--quantization", default="int4", choices=["none", "int4", "nf4"], help="the target as served")
    head.add_argument("--out", type=Path, default=None, help="default: assets/draft-heads/<model>.pt")
    head.add_argument("--k-vocab", type=int, default=8192, help="tokens the head drafts (the most frequent)")
    head.add_argument("--steps", type=int, default=600)
    head.add_argument("--minutes", type=float, default=90.0, help="stop after this much training time")
    head.add_argument(
        "--checkpoint-every", type=int, default=50, help="steps between checkpoints (each with a held-out evaluation)"
    )
    head.add_argument("--seed", type=int, default=0)
    head.set_defaults(func=_train_draft_head)

    coe = sub.add_parser("train-coe", help="train the CoE router's classifier head (and propose its expert map)")
    coe.add_argument("--data", type=Path, default=None, help="labelled prompts (default: the project's set)")
    coe.add_argument("--out", type=Path, default=None, help="where the head goes (default: assets/coe)")
    coe.add_argument("--epochs", type=int, default=300)
    coe.add_argument("--seed", type=int, default=0)
    coe.add_argument(
        "--target-accuracy",
        type=float,
        default=0.9,
        help="calibrate min_confidence: the lowest whose held-out routed accuracy reaches this",
    )
    coe.add_argument("--propose-map", action="store_true", help="also propose the expert map from benchmark scores")
    coe.add_argument("--propose-map-only", action="store_true", help="only propose the map")
    coe.add_argument(
        "--scores",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "routing_quality.json",
        help="a run of benchmarks/routing_quality.py (accuracy per category on its dev split, bits per byte)",
    )
    # the floor's defaults are router.coe.propose.Floor's (not imported here: it needs torch)
    coe.add_argument("--accuracy-floor", type=float, help="accuracy a cheaper expert may lose (default 0.02: 2 points)")
    coe.add_argument("--bits-floor", type=float, help="share of bits per byte it may lose (default 0.05)")
    coe.add_argument(
        "--noise-z",
        type=float,
        help="a category leaves the best expert overall only for a lead this many standard errors clear "
        "(paired; default 1.645)",
    )
    coe.add_argument(
        "--cost-budget",
        type=float,
        default=None,
        help="opt in to trading quality for cost: mean activated parameters per token as a share of the "
        "quality-first map's (reports the accuracy given up)",
    )
    coe.set_defaults(func=_train_coe)

    r2r = sub.add_parser("train-r2r", help="label small/large divergences and train the R2R token router (resumable)")
    r2r.add_argument("--out", type=Path, default=None, help="where the router goes (default: assets/r2r)")
    r2r.add_argument("--prompts", type=int, default=320, help="prompts the large model answers")
    r2r.add_argument("--max-tokens", type=int, default=80, help="tokens per answer")
    r2r.add_argument("--window", type=int, default=8, help="continuation tokens per branch when labelling")
    r2r.add_argument("--tau", type=float, default=0.5, help="nats per token that make a branch divergent")
    r2r.add_argument("--mode", choices=["recall", "budget"], default="recall", help="what the threshold targets")
    r2r.add_argument("--target", type=float, default=0.95, help="recall of divergent tokens, or large-token budget")
    r2r.add_argument("--seed", type=int, default=0)
    r2r.set_defaults(func=_train_r2r)

    models = sub.add_parser("models", help="fetch or list cached models")
    msub = models.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="download and convert zoo models (all when none named)")
    pull.add_argument("names", nargs="*")
    pull.set_defaults(func=_pull)
    msub.add_parser("list", help="show the zoo and what is cached").set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (KeyError, FileNotFoundError, ValueError) as exc:
        print(f"turnout: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
