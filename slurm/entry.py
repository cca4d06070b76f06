"""`nlip-ds` as a script path, for `deepspeed --launcher slurm`, which starts `python -u SCRIPT ARGS` on every
rank and has no equivalent of `--module`."""
import sys

from nlip_ds.cli import main

if __name__ == "__main__":
    sys.exit(main())
