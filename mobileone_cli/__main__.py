"""`python -m mobileone_cli`: the same as the `mobileone` command."""
from mobileone_cli.cli import entry_point

if __name__ == "__main__":
    entry_point()
