"""The run folder: its layout (layout.py), the atomic checkpoint commit with manifests and the resume check
(checkpoint.py), and a trained model read back from it (model.py). docs/architecture.md has the whole layout."""
