"""`nlip-ds` as a script path, for `deepspeed --launcher slurm`, which starts `python -u SCRIPT ARGS` on every
rank and has no equivalent of `--module`."""
from nlip_ds.cli import entry

if __name__ == "__main__":
    entry()
