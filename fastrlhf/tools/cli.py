"""The ``fastrlhf`` command: one subcommand per stage plus tools.

    fastrlhf sft | rm | ppo | grpo  train one stage (``--config run.yaml``, any field as ``--field value``; ``--help``)
    fastrlhf pipeline             all three stages on the built-in task (no arguments needed)
    fastrlhf generate | eval      sample from / evaluate a checkpoint
    fastrlhf bench NAME [...]     benchmark runners: fastrlhf.benchmarks.run_NAME.main(argv)
    fastrlhf selfcheck            every kernel against its float64 reference, as a table

Errors in user input (config, data, checkpoints, bad values) print one line naming the file/line/field and exit with
status 2; set FASTRLHF_DEBUG=1 for the traceback. A non-finite loss exits with status 1. Ctrl-C inside a training loop
saves a checkpoint first, then exits with status 130.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys

# command -> (module, one-line description); modules are imported only when their command runs
COMMANDS = {
    "sft": ("fastrlhf.stages.sft", "stage 1: supervised fine-tuning on demonstrations"),
    "rm": ("fastrlhf.stages.reward", "stage 2: reward model on ranked comparisons"),
    "ppo": ("fastrlhf.stages.ppo", "stage 3: PPO against the reward model with a KL penalty"),
    "grpo": ("fastrlhf.stages.grpo", "critic-free RL: GRPO / Dr.GRPO / RLOO with Python reward functions or a reward model"),
    "pipeline": ("fastrlhf.tools.pipeline", "SFT -> RM -> PPO -> eval on the built-in task (<= 5 min on 2 CPU cores); "
                 "--rl grpo: SFT -> GRPO on the exact-match score -> eval"),
    "generate": ("fastrlhf.tools.generate", "sample responses from a checkpoint"),
    "eval": ("fastrlhf.tools.evaluate", "evaluate a policy checkpoint (judge / reward model scores, win rate)"),
    "bench": ("fastrlhf.benchmarks", "benchmark runners: fastrlhf bench NAME [args] (fastrlhf bench --help lists them)"),
    "selfcheck": ("fastrlhf.tools.selfcheck", "run every kernel against its float64 reference and print a table"),
}

DISTRIBUTED_COMMANDS = ("sft", "rm", "ppo", "grpo")  # the stages that run data-parallel under torchrun (FSDP2)


def usage() -> str:
    w = max(map(len, COMMANDS))
    lines = ["usage: fastrlhf <command> [--config FILE] [--field value ...]", "", "commands:"]
    lines += [f"  {name.ljust(w)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "fastrlhf <command> --help lists the fields of a command with their defaults and meaning.",
              "Several GPUs / nodes (FSDP2): torchrun --nproc_per_node N -m fastrlhf sft|rm|ppo|grpo [fields] "
              "(batch sizes are per rank)."]
    return "\n".join(lines)


def bench_names() -> list[str]:
    """Benchmark runners: the ``run_NAME`` modules of fastrlhf.benchmarks, listed as NAME (by file; nothing imported)."""
    try:
        pkg = importlib.import_module("fastrlhf.benchmarks")
    except ImportError:
        return []
    return sorted(m.name[len("run_"):] for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("run_"))


def _bench(argv: list[str]):
    names = bench_names()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastrlhf bench NAME [args]\n\nbenchmark runners: " + (", ".join(names) or "(none installed)"))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in names:
        raise _UsageError(f"bench: unknown benchmark '{name}' (available: {', '.join(names) or 'none'})")
    mod = importlib.import_module(f"fastrlhf.benchmarks.run_{name}")
    if not hasattr(mod, "main"):
        raise _UsageError(f"bench: fastrlhf.benchmarks.run_{name} has no main(argv)")
    return mod.main(rest)


class _UsageError(Exception):
    pass


def _user_errors() -> tuple[type, ...]:
    """Exception types that mean bad input (reported in one line) rather than a bug."""
    from fastrlhf.runtime.config import ConfigError
    errors: list[type] = [ConfigError, _UsageError, FileNotFoundError]
    for mod, name in (("fastrlhf.runtime.data", "DataError"), ("fastrlhf.runtime.checkpoint", "CheckpointError"),
                      ("fastrlhf.models.hf_io", "ModelFolderError")):
        try:
            errors.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """The ``fastrlhf`` command. Under torchrun an uncaught error is also recorded in torchrun's error file (its
    summary then names the failing rank and shows its traceback; torchrun stops the other ranks)."""
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import record
        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from fastrlhf import __version__
        print(f"fastrlhf {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"fastrlhf: unknown command '{cmd}'\n\n{usage()}", file=sys.stderr)
        return 2
    debug = os.environ.get("FASTRLHF_DEBUG") == "1"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: say which rank failed
        cmd_name = f"{cmd} [rank {os.environ.get('RANK', '?')}]"
    else:
        cmd_name = cmd
    user_errors = _user_errors()
    if cmd not in DISTRIBUTED_COMMANDS and "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ:
        print(f"fastrlhf {cmd_name}: error: '{cmd}' runs in one process; under torchrun use "
              f"{'|'.join(DISTRIBUTED_COMMANDS)} (e.g. torchrun --nproc_per_node 8 -m fastrlhf ppo ...)", file=sys.stderr)
        return 2
    try:
        if cmd == "bench":
            result = _bench(rest)
        else:
            module = importlib.import_module(COMMANDS[cmd][0])
            result = module.main(rest)
    except SystemExit as e:  # --help of a command
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except KeyboardInterrupt:
        _end_progress_line()
        print(f"\nfastrlhf {cmd_name}: interrupted", file=sys.stderr)
        return 130
    except user_errors as e:
        if debug:
            raise
        _end_progress_line()
        print(f"fastrlhf {cmd_name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, FloatingPointError) as e:  # bad values / combinations (2), a non-finite loss (1): one line
        if debug:
            raise
        _end_progress_line()
        print(f"fastrlhf {cmd_name}: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2
    if isinstance(result, dict) and result.get("interrupted"):  # Ctrl-C / SIGTERM: the stage saved, then stopped
        print(f"fastrlhf {cmd_name}: interrupted (saved {result.get('checkpoint')})", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (a multi-line message from a library is joined)."""
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())


def _end_progress_line() -> None:
    """Close any progress bar still drawn on stderr, so that the error line starts on a fresh line."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        bar.close()
    if bars:
        sys.stderr.write("\n")
        sys.stderr.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
