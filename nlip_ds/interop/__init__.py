"""Export formats that other libraries read: transformers' CLIPModel (`hf-clip`) and open_clip (`open_clip`).

towers.py reads NLIPModel's two towers into CLIP's standard pieces (one owner of the mapping and of the
checks that refuse a model which would not map exactly); hf_clip.py and openclip.py name those pieces the way
each library does and write its folder; folder.py writes the tokenizer and README.md of every export folder;
write.py checks the asked formats and runs the writers. See docs/export.md. Nothing here imports DeepSpeed:
train/export.py consolidates the run and calls write.py.
"""
# kept free of imports so that the command line can list the formats without loading torch
FORMATS = ("nlip", "hf-clip", "open_clip")
