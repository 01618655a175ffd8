"""`consistency-lens` command line: thin subcommands, each a dataclass that declares its arguments,
is built from them and has one `execute`."""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from consistency_lens.config import LensConfig, load_config
from consistency_lens.errors import LensError
from consistency_lens.utils.io import is_out_of_space


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        type=Path,
        default=[],
        help="YAML config (repeatable, merged in order)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. layer=12 train.t_text=8"
    )


def _checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="saved lens directory or Hub repo id org/name (default: <train.run_dir>/lens; "
        "explain, when no run has started "
        "there: the lens shipped for the model)",
    )


def _config(args: argparse.Namespace) -> LensConfig:
    return load_config(args.config, args.overrides)


@dataclass
class Dump:
    """Dump activations (A at block `layer`, position P) of `model` over `corpus`."""

    cfg: LensConfig

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""
        _config_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> Dump:
        """The command for parsed `args` (`argv` is the whole command line)."""
        return cls(_config(args))

    def execute(self) -> None:
        from consistency_lens.data.dump import dump_activations

        dump_activations(self.cfg)


@dataclass
class Train:
    """Train a lens on a dump."""

    cfg: LensConfig
    resume: bool = False
    argv: list[str] | None = None
    """The command line, so that a stop by a signal can print the exact command that resumes."""

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""
        _config_arguments(parser)
        _resume_argument(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> Train:
        """The command for parsed `args` (`argv` is the whole command line)."""
        return cls(_config(args), resume=args.resume, argv=list(argv))

    def execute(self) -> None:
        from consistency_lens.training.trainer import train

        _stoppable(self.argv, train, self.cfg, resume=self.resume)


def _resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest valid checkpoint"
    )


def resume_command(argv: list[str]) -> str:
    """The shell command that reruns `argv` (a `train` command line) with `--resume`."""
    args = list(argv) if "--resume" in argv else [*argv, "--resume"]
    return shlex.join(["consistency-lens", *args])


def _stoppable(argv: list[str] | None, run, *args, **kwargs):
    """`run(*args, **kwargs)`; a stop by a signal is re-raised naming the command that resumes."""
    from consistency_lens.training.trainer import TrainingStopped

    try:
        return run(*args, **kwargs)
    except TrainingStopped as stopped:
        command = resume_command(argv) if argv is not None else None
        raise TrainingStopped(stopped.signal_name, stopped.step, command) from None


@dataclass
class TrainCeiling:
    """Train a lens's context ceiling: an E that reads only the true last T_text context tokens
    (budget: the config's train.steps, batch_size, lr, lr_blocks, mse_weight, alpha)."""

    cfg: LensConfig
    checkpoint: Path
    resume: bool = False
    argv: list[str] | None = None
    """The command line, so that a stop by a signal can print the exact command that resumes."""

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""
        _config_arguments(parser)
        parser.add_argument(
            "--checkpoint",
            type=Path,
            required=True,
            help="saved lens directory; its E's shape and T_text are used, and the ceiling is "
            "written into it (context_ceiling/)",
        )
        _resume_argument(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> TrainCeiling:
        """The command for parsed `args` (`argv` is the whole command line)."""
        return cls(_config(args), args.checkpoint, resume=args.resume, argv=list(argv))

    def execute(self) -> None:
        from consistency_lens.models.lens import check_lens_dir
        from consistency_lens.training.trainer import train_ceiling

        check_lens_dir(self.checkpoint)
        path = _stoppable(self.argv, train_ceiling, self.cfg, self.checkpoint, self.resume)
        print(f"context ceiling: {path}")


@dataclass
class Eval:
    """Evaluate a saved lens against baselines on the validation split."""

    cfg: LensConfig
    checkpoint: Path | None = None
    output: Path | None = None

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""
        _config_arguments(parser)
        _checkpoint_argument(parser)
        parser.add_argument(
            "--output",
            type=Path,
            help="directory for eval_results.json and samples (default: train.run_dir, or "
            "<run_dir>/eval_<corpus> on another corpus than the lens's); never the lens directory",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> Eval:
        """The command for parsed `args` (`argv` is the whole command line)."""
        return cls(_config(args), checkpoint=args.checkpoint, output=args.output)

    def execute(self) -> None:
        from consistency_lens.evaluation.commands import evaluate_command

        evaluate_command(self.cfg, self.checkpoint, self.output)


@dataclass
class Card:
    """Write a saved lens's model card (README.md) from an eval results file."""

    lens: Path
    results: Path

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""
        parser.add_argument("lens", type=Path, help="saved lens directory")
        parser.add_argument(
            "--results", type=Path, required=True, help="eval_results.json of this lens (from eval)"
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> Card:
        """The command for parsed `args` (`argv` is the whole command line)."""
        return cls(args.lens, args.results)

    def execute(self) -> None:
        from consistency_lens.evaluation.commands import card_command

        print(f"model card: {card_command(self.lens, self.results)}")


@dataclass
class Compare:
    """Compare two lenses' eval results on the same samples, paired: B − A with bootstrap CIs."""

    first: Path
    second: Path
    bootstrap: int | None = None
    output: Path | None = None

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""
        parser.add_argument("first", type=Path, help="eval_results.json of lens A")
        parser.add_argument("second", type=Path, help="eval_results.json of lens B (same samples)")
        parser.add_argument(
            "--bootstrap", type=int, default=None, help="resamples (default: A's eval's)"
        )
        parser.add_argument("--output", type=Path, default=None, help="also write it as JSON here")

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> Compare:
        """The command for parsed `args` (`argv` is the whole command line)."""
        return cls(args.first, args.second, args.bootstrap, args.output)

    def execute(self) -> None:
        from consistency_lens.evaluation.compare import compare_command

        compare_command(self.first, self.second, self.bootstrap, self.output)


@dataclass
class Push:
    """Upload a saved lens folder (its lens files only) to a Hugging Face Hub repo."""

    lens: Path
    repo_id: str
    private: bool = False

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""
        parser.add_argument("lens", type=Path, help="saved lens directory")
        parser.add_argument("repo_id", help="Hub repo id, org/name (created if missing)")
        parser.add_argument(
            "--private", action="store_true", help="create the repo private if it is new"
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> Push:
        """The command for parsed `args` (`argv` is the whole command line)."""
        return cls(args.lens, args.repo_id, args.private)

    def execute(self) -> None:
        from consistency_lens.models.hub import push_lens

        print(f"pushed: {push_lens(self.lens, self.repo_id, self.private)}")


@dataclass
class Cast:
    """Store a saved lens's weights (and its context ceiling's) in another dtype, e.g. bfloat16."""

    lens: Path
    dtype: str

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""
        from consistency_lens.models.storage import DTYPES

        parser.add_argument("lens", type=Path, help="saved lens directory (rewritten in place)")
        parser.add_argument("--dtype", required=True, choices=list(DTYPES))

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> Cast:
        """The command for parsed `args` (`argv` is the whole command line)."""
        return cls(args.lens, args.dtype)

    def execute(self) -> None:
        from consistency_lens.models.storage import store_weights_as

        rewritten = store_weights_as(self.lens, self.dtype)
        for path in rewritten:
            print(f"stored as {self.dtype}: {path}")
        if rewritten:
            print(
                f"The card's eval numbers were for the old weights; run `consistency-lens eval "
                f"--checkpoint {self.lens}` and `consistency-lens card {self.lens} --results ...`."
            )
        else:
            print(f"already {self.dtype}: {self.lens}")


@dataclass
class Explain:
    """Explain every token position of a text with a saved lens."""

    cfg: LensConfig
    checkpoint: Path | None = None
    text: str | None = None
    file: Path | None = None
    html: Path | None = None

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""
        _config_arguments(parser)
        _checkpoint_argument(parser)
        parser.add_argument("--text", help="text to explain")
        parser.add_argument("--file", type=Path, help="file whose text to explain")
        parser.add_argument("--html", type=Path, help="also write an HTML page here")

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> Explain:
        """The command for parsed `args` (`argv` is the whole command line)."""
        return cls(_config(args), args.checkpoint, args.text, args.file, args.html)

    def execute(self) -> None:
        from consistency_lens.evaluation.explain import explain_command

        text = _read_text_file(self.file) if self.file is not None else self.text
        if text is None:
            raise LensError('explain needs --text "..." or --file PATH.')
        if self.html is not None and (self.html.is_dir() or self.html.name in ("", ".", "..")):
            # Checked before the model loads, so a typo costs no work and writes nothing.
            raise LensError(
                f"--html '{self.html}' is a directory; pass a file path such as "
                f"'{self.html / 'explain.html'}'."
            )
        explain_command(self.cfg, self.checkpoint, text, self.html)


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LensError(f"--file '{path}' does not exist; pass an existing text file.") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise LensError(f"--file '{path}' is not a UTF-8 text file; pass a text file.") from None


@dataclass
class Serve:
    """Serve a lens viewer in the browser: a JSON API and one page, on 127.0.0.1 by default."""

    cfg: LensConfig
    checkpoints: list[Path]
    host: str = "127.0.0.1"
    port: int = 8000
    max_chars: int = 4000
    max_tokens: int = 512
    threads: int | None = None

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""
        _config_arguments(parser)
        parser.add_argument(
            "--checkpoint",
            type=Path,
            action="append",
            default=[],
            help="saved lens directory, repeatable; the page chooses among them by name (the "
            "folder's); default: the lens shipped for the model",
        )
        parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="port to bind (8000)")
        parser.add_argument(
            "--max-chars", type=int, default=4000, help="longest text in characters (4000)"
        )
        parser.add_argument(
            "--max-tokens", type=int, default=512, help="longest text in tokens (512)"
        )
        parser.add_argument(
            "--threads",
            type=int,
            help="CPU threads of the model worker (default: torch's, one per core; 1 is faster "
            "on a machine other work keeps busy)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> Serve:
        """The command for parsed `args` (`argv` is the whole command line)."""
        return cls(
            _config(args),
            args.checkpoint,
            args.host,
            args.port,
            args.max_chars,
            args.max_tokens,
            args.threads,
        )

    def execute(self) -> None:
        from consistency_lens.serve.app import Limits, serve_command

        if not 0 < self.port < 65536 or min(self.max_chars, self.max_tokens, self.threads or 1) < 1:
            raise LensError(
                "--port must be 1..65535 and --max-chars, --max-tokens, --threads at least 1; "
                "pass valid values."
            )
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        limits = Limits(max_chars=self.max_chars, max_tokens=self.max_tokens)
        serve_command(self.cfg, self.checkpoints, self.host, self.port, limits)


@dataclass
class Demo:
    """The whole pipeline on the embedded default: dump, train, eval, explain, report."""

    cfg: LensConfig

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""
        _config_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> Demo:
        """The command for parsed `args` (`argv` is the whole command line)."""
        return cls(_config(args))

    def execute(self) -> None:
        from consistency_lens.demo import run_demo

        run_demo(self.cfg)


# Every subcommand, in the order `--help` lists them: the one list the parser is built from.
COMMANDS = {
    "dump": Dump,
    "train": Train,
    "train-ceiling": TrainCeiling,
    "eval": Eval,
    "explain": Explain,
    "serve": Serve,
    "demo": Demo,
    "card": Card,
    "compare": Compare,
    "push": Push,
    "cast": Cast,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="consistency-lens", description=__doc__)
    subs = parser.add_subparsers(dest="command", required=True)
    for name, cls in COMMANDS.items():
        cls.arguments(subs.add_parser(name, help=cls.__doc__, description=cls.__doc__))
    return parser


def build_command(argv: list[str]) -> object:
    """Parse argv into a subcommand object."""
    args = _parser().parse_args(argv)
    return COMMANDS[args.command].from_args(args, argv)


# errnos that mean "this path cannot be used as given" (the user's to fix, never a bug).
_PATH_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory",
    errno.ELOOP: "a symbolic link loops",
    errno.EEXIST: "a file or dangling link is in the way",
    errno.ENAMETOOLONG: "the name is too long",
}


def _path_problem(err: BaseException) -> str | None:
    """One sentence for an OSError about a path the user chose (read-only, a file, a loop)."""
    if not isinstance(err, OSError) or err.errno not in _PATH_ERRNOS or not err.filename:
        return None
    return (
        f"Cannot use '{err.filename}' ({_PATH_ERRNOS[err.errno]}); choose a writable path "
        "(output_dir, cache_dir, train.run_dir, --html) that is a directory where one is meant."
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: run a subcommand; user errors print one line and exit with status 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        build_command(argv).execute()
    except LensError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        path_problem = _path_problem(err)
        if path_problem is not None:
            print(f"error: {path_problem}", file=sys.stderr)
            sys.exit(2)
        # A full disk can surface from any writer; it is the user's to fix, not a bug to trace.
        if not is_out_of_space(err):
            raise
        where = f" while writing '{err.filename}'" if getattr(err, "filename", None) else ""
        print(
            f"error: No space left on the device{where}; free disk space and run the same "
            "command again (train: with --resume).",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        # Outside train's loop (which checkpoints on the first Ctrl-C), or a second Ctrl-C.
        if argv[:1] in (["train"], ["train-ceiling"]):
            hint = f"continue with: {resume_command(argv)}"
        else:
            hint = "run the same command again to resume"
        print(f"interrupted; {hint}.", file=sys.stderr)
        sys.exit(130)
