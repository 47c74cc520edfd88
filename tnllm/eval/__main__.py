"""`python -m tnllm.eval perplexity --checkpoint DIR ...` or `python -m tnllm.eval harness ...`."""
import sys

USAGE = ("usage: python -m tnllm.eval perplexity --checkpoint DIR_OR_EXPORT [--data PATH] ...\n"
         "       python -m tnllm.eval harness --model tnllm --model_args checkpoint=DIR "
         "--tasks TASKS ...")


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "perplexity":
        from absl import app

        from tnllm.eval import perplexity

        perplexity._define_flags()
        app.run(perplexity.main, argv=[f"{sys.argv[0]} perplexity"] + sys.argv[2:])
    elif command == "harness":
        try:
            from tnllm.eval import harness
        except ImportError as e:
            raise SystemExit(f"error: the harness needs lm-evaluation-harness ({e.name} is missing); "
                             "pip install '.[eval]'.") from None
        harness.cli(sys.argv[2:])
    else:
        raise SystemExit(f"error: unknown command {command!r}; the commands are perplexity and "
                         f"harness.\n{USAGE}")


if __name__ == "__main__":
    main()
