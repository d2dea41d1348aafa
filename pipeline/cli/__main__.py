"""``python -m pipeline.cli``: the `detflow` command."""

from pipeline.cli import main

if __name__ == "__main__":  # importing the module (tests walk every module) runs nothing
    main()
