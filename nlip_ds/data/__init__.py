"""Data for nlip-ds: synthetic noisy pairs with ground truth, webdataset shards, the loader, the tokenizer.

    synthetic.py  `synthesize()`: procedurally drawn scenes with captions and known noise (`nlip-ds data synth`)
    shards.py     the shard format; `convert_jsonl()`, `convert_image_folder()`, `inspect()`
    samples.py    per-sample decode, image transforms and collation
    pipeline.py   `build_loader()`: exact-epoch or resampled loading with resumable positions
    tokenizer.py  `train_tokenizer()`, `load_tokenizer()`, `ensure_tokenizer()` and the `Tokenizer` wrapper
    cli.py        the `nlip-ds data` subcommands

Submodules are imported on use, so the CLI's shard tools start without loading torch.
"""
