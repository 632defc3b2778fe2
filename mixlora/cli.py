"""The `mixlora` command: train, eval, generate, inspect, export (also `python -m mixlora`).

Bad input (an invalid config value, an unknown task, a data file with wrong fields, an unsupported base model, an
adapter built for another base, a truncated or corrupt file) ends with one line `mixlora: error: ...` on stderr and
exit code 2. torch and transformers are imported only by the command that runs, after its arguments and files have
been checked, so `--help` and those errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import yaml

_EPILOG_TRAIN = """\
Settings come from --config FILE (JSON or YAML, the keys above with '_') and the options above (they win; '_'
and '-' are the same).
Values are read as YAML scalars (8, 1e-3, true); lists as a,b,c. A bare flag (--resume) means true.
Several adapters trained together (config file): 'adapters:' maps each name to its adapter keys, 'data' and/or
'tasks', and optionally 'lr'; top-level adapter keys are their defaults, batch_size is per adapter, and each adapter
is written to OUTPUT_DIR/NAME. Example:
  base_model: my-base
  steps: 200
  adapters:
    colors: {{data: colors.jsonl, num_experts: 8, top_k: 2, r: 8}}
    animals: {{data: animals.jsonl, num_experts: 4, top_k: 1, r: 4, lr: 5.0e-4}}
With no arguments: SmolLM2-135M-Instruct on BIG-bench {tasks} (about 3 minutes on a 2-core CPU)."""


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader, except that exponent floats without a dot (`1e-3`, `5E-4`) are floats, not strings."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


class UsageError(ValueError):
    """A bad command line."""


def _yaml_value(text: str) -> object:
    """A command-line value read as a YAML scalar (8, 1e-3, true, null), or the text itself."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError:
        return text


def _read_config_file(path: str) -> dict[str, object]:
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            values = json.load(f) if path.endswith(".json") else yaml.load(f, Loader=_YamlLoader)
        except UnicodeDecodeError:
            raise UsageError(f"config file {path} is not a text file (expected JSON or YAML)") from None
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise UsageError(f"config file {path}: {' '.join(str(e).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings, got {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _setting_fields() -> list[tuple[str, object, str, str]]:
    """(key, shown default, help, group) of every `mixlora train` setting given as an option: the TrainConfig fields
    (but the `adapter`/`adapters` mappings, config-file only) and the MixLoraConfig fields of the adapter."""
    from dataclasses import MISSING, fields

    from mixlora.config import MixLoraConfig
    from mixlora.train_config import ADAPTER_FIELDS, CPU_DEFAULTS, DEFAULT_ADAPTER, GPU_DEFAULTS, TrainConfig

    out = []
    for f in fields(TrainConfig):
        if f.name in ("adapter", "adapters"):
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.name in CPU_DEFAULTS:
            default = f"{CPU_DEFAULTS[f.name]} on CPU, {GPU_DEFAULTS[f.name]} on GPU"
        out.append((f.name, default, f.metadata.get("help", ""), "training"))
    for f in fields(MixLoraConfig):
        if f.name in ADAPTER_FIELDS:
            default = f.default if f.default is not MISSING else f.default_factory()
            out.append((f.name, DEFAULT_ADAPTER.get(f.name, default), f.metadata.get("help", ""), "adapter"))
    return out


def train_settings(args) -> dict[str, object]:
    """The settings of `mixlora train`: the config file's, then the options given (they win)."""
    values = _read_config_file(args.config) if args.config else {}
    values.update({key: getattr(args, key) for key, *_ in _setting_fields() if hasattr(args, key)})
    return values


def _cmd_train(args) -> int:
    from mixlora.train import config_from_dict, train

    train(config_from_dict(train_settings(args)))
    return 0


def _dashed(option: str) -> str:
    key, eq, value = option.partition("=")
    return key.replace("_", "-") + eq + value


def _unknown_setting(token: str) -> UsageError:
    from mixlora.config import did_you_mean

    key = token[2:].partition("=")[0].replace("-", "_")
    known = [key for key, *_ in _setting_fields()]
    return UsageError(f"unknown config key {key!r}{did_you_mean(key, known)} (`mixlora train --help` lists the keys)")


def _adapter_config(path: str):
    """The MixLoraConfig of the adapter directory `path`, read before anything heavy is imported; a file where the
    directory is expected, or a missing one, is an error naming it."""
    from mixlora.config import CONFIG_NAME, MixLoraConfig
    from mixlora.fileio import AdapterFileError

    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    if not os.path.isdir(path):
        folder = os.path.dirname(path) or "."
        hint = (f"pass the adapter directory {folder}" if os.path.isfile(os.path.join(folder, CONFIG_NAME))
                else f"pass the adapter directory (the one that holds {CONFIG_NAME})")
        raise AdapterFileError(path, f"is a file, not an adapter directory: {hint}")
    return MixLoraConfig.from_pretrained(path)


def _load_adapter_model(args):
    """(model, tokenizer, adapter config) for eval/generate/inspect."""
    config = _adapter_config(args.adapter)
    base = args.base_model or config.base_model_name_or_path
    if not base:
        raise UsageError(f"{args.adapter}: the adapter records no base model; pass --base-model")
    print(f"mixlora {args.command}: loading the adapter {args.adapter} on {base} ...", file=sys.stderr, flush=True)
    from transformers import AutoTokenizer

    from mixlora.base_models import resolve_base_model
    from mixlora.model import MixLoraModelForCausalLM

    base = resolve_base_model(base)
    model, config = MixLoraModelForCausalLM.from_pretrained(args.adapter, base_model_name_or_path=base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, config


def _recorded_config(summary_path: str) -> dict:
    """The training config recorded in a train_summary.json."""
    from mixlora.fileio import AdapterFileError

    try:
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(summary_path, f"is not valid JSON ({e}); pass --data or --tasks to evaluate "
                                             "without it") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise AdapterFileError(summary_path, "records no training config (no 'config' mapping)")
    return summary["config"]


def _eval_examples(args, adapter_dir: str):
    """Held-out evaluation examples: --data/--tasks, else the data and tasks recorded in train_summary.json (for an
    adapter OUTPUT_DIR/NAME of a multi-adapter run, in OUTPUT_DIR's)."""
    from mixlora.data import load_examples, split_examples
    from mixlora.train_config import DEFAULT_TASKS
    from mixlora.train_state import SUMMARY_NAME

    data, tasks, seed, eval_size = args.data, args.tasks, 0, args.limit
    if data is None and tasks is None:
        trained = recorded = None
        summary_path = os.path.join(adapter_dir, SUMMARY_NAME)
        if os.path.isfile(summary_path):
            trained = recorded = _recorded_config(summary_path)
        else:
            # An adapter of a multi-adapter run is OUTPUT_DIR/NAME; OUTPUT_DIR's summary records its data.
            parent, name = os.path.split(os.path.normpath(adapter_dir))
            summary_path = os.path.join(parent, SUMMARY_NAME)
            if os.path.isfile(summary_path):
                trained = _recorded_config(summary_path)
                recorded = (trained.get("adapters") or {}).get(name)
        if recorded is not None:
            data, tasks, seed = recorded["data"], recorded["tasks"], trained["seed"]
            eval_size = eval_size or trained["eval_size"]
    tasks = tasks if tasks is not None else ([] if data else list(DEFAULT_TASKS))
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    grouped = load_examples(data, tasks)
    if eval_size:
        # The held-out split of training (same seed): examples the adapter has not been trained on.
        _, held_out = split_examples(grouped, eval_size, None, seed)
        return held_out
    return {t: [e for e in v if e.choices] for t, v in grouped.items()}


def _cmd_eval(args) -> int:
    _adapter_config(args.adapter)  # a bad path fails here, before any data is read or torch is imported
    examples = _eval_examples(args, args.adapter)
    model, tokenizer, _ = _load_adapter_model(args)
    from mixlora.evaluate import accuracy, format_accuracy_table

    result = accuracy(model, tokenizer, examples, args.max_seq_len, args.batch_size, desc="eval")
    print(format_accuracy_table(None, result))
    return 0


def _cmd_generate(args) -> int:
    model, tokenizer, _ = _load_adapter_model(args)
    from mixlora.evaluate import generate

    print(generate(model, tokenizer, args.prompt, args.max_new_tokens))
    return 0


def _cmd_inspect(args) -> int:
    _adapter_config(args.adapter)  # a bad path fails here, before any data is read or torch is imported
    grouped = _eval_examples(args, args.adapter)
    examples = [e for v in grouped.values() for e in v]
    model, tokenizer, _ = _load_adapter_model(args)
    from mixlora.evaluate import format_router_table, heatmap_path, plot_expert_load, router_statistics

    stats = router_statistics(model, tokenizer, examples, args.max_seq_len, args.batch_size, desc="inspect")
    print(format_router_table(stats))
    path = heatmap_path(args.adapter)
    plot_expert_load(stats, path)
    print(f"heatmap: {path}")
    return 0


def _cmd_export(args) -> int:
    from mixlora.export import check_routing_strategy, export_moe

    check_routing_strategy(args.adapter)  # refused before the base model is loaded
    _adapter_config(args.adapter)  # a bad path fails here, before the base model is loaded
    print(f"mixlora export: loading the adapter {args.adapter} and its base ...", file=sys.stderr, flush=True)
    summary = export_moe(args.adapter, args.output, format=args.format, dtype=args.dtype,
                         base_model_name_or_path=args.base_model, overwrite=args.overwrite, progress=True)
    print(summary)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from mixlora.train_config import DEFAULT_TASKS

    parser = argparse.ArgumentParser(prog="mixlora", description="Fine-tune and use MixLoRA adapters.")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,generate,inspect,export}")
    train = sub.add_parser("train", help="fine-tune a base model with a MixLoRA adapter", allow_abbrev=False,
                           usage="mixlora train [--config FILE] [--KEY [VALUE] ...]",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=_EPILOG_TRAIN.format(tasks=", ".join(DEFAULT_TASKS)))
    train.add_argument("--config", help="JSON or YAML file of settings")
    groups = {"training": train.add_argument_group("training settings"),
              "adapter": train.add_argument_group("adapter settings (MixLoraConfig; with 'adapters' in the config "
                                                  "file, each adapter's defaults)")}
    for key, default, help, group in _setting_fields():
        shown = ",".join(default) if isinstance(default, list) else default
        groups[group].add_argument(f"--{key.replace('_', '-')}", dest=key, type=_yaml_value, nargs="?", const=True,
                                   default=argparse.SUPPRESS, metavar="VALUE",
                                   help=help if "default" in help else f"{help} (default: {shown})")
    train.set_defaults(func=_cmd_train)

    def adapter_command(name: str, help: str, func, data: bool = True):
        p = sub.add_parser(name, help=help)
        p.add_argument("adapter", help="adapter directory")
        p.add_argument("--base-model", help="base model dir or .gguf (default: the one the adapter records)")
        if data:
            p.add_argument("--data", help="JSON/JSONL file (default: the data the adapter was trained on)")
            p.add_argument("--tasks", help="comma-separated task names")
            p.add_argument("--limit", type=_positive_int, default=None, help="held-out examples per task")
            p.add_argument("--max-seq-len", type=_positive_int, default=256)
            p.add_argument("--batch-size", type=_positive_int, default=16)
        p.set_defaults(func=func)
        return p

    adapter_command("eval", "per-task multiple-choice accuracy", _cmd_eval)
    gen = adapter_command("generate", "generate text with the adapter", _cmd_generate, data=False)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
    adapter_command("inspect", "per-layer expert load and router entropy, with a heatmap", _cmd_inspect)
    export = adapter_command("export", "write the model as a standard MoE checkpoint (Mixtral, Qwen3-MoE) to serve",
                             _cmd_export, data=False)
    export.add_argument("--output", required=True, help="output directory (written atomically)")
    export.add_argument("--format", choices=("auto", "mixtral", "qwen3_moe", "qwen2_moe"), default="auto",
                        help="target class (default: from the base architecture)")
    export.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="dtype of the checkpoint (default: the base's)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mixlora` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        argv = ["train"]
    if argv[0] == "train":  # --output_dir is --output-dir
        argv = [_dashed(t) if t.startswith("--") else t for t in argv]
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if extra and args.command == "train" and extra[0].startswith("--"):
            raise _unknown_setting(extra[0])
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except (ValueError, OSError) as e:
        # One line: messages of nested errors (e.g. a config file path prefixed to a MixLoraConfig error) included.
        # OSError: a file that cannot be read or written (missing, a directory, no permission), named by its message.
        print(f"mixlora: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
