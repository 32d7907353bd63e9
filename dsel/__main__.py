"""`python -m dsel` and `torchrun -m dsel` enter the same CLI as the `dsel` command."""
from dsel.cli import main

if __name__ == "__main__":
    main()
