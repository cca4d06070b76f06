"""Max |difference| between NLIPModel and its hf-clip / open_clip exports (docs/export.md): image embeddings,
text embeddings and logits on 8 random images and 5 captions, for the tiny demo shapes and for the paper's
tower shapes (ViT-B/32 at 224 px, 12-layer text; random weights, decoders shrunk since they are not exported).

    python benchmarks/export_exactness.py TOKENIZER_DIR      # e.g. demo_data/tokenizer after the demo
"""
import sys
import tempfile
from pathlib import Path

import open_clip
import torch
from transformers import CLIPModel

from nlip_ds.config import ModelConfig, load_config
from nlip_ds.data.tokenizer import load_tokenizer
from nlip_ds.interop.folder import Source
from nlip_ds.interop.write import write_exports
from nlip_ds.model import NLIPModel

CAPTIONS = ["a red circle", "two blue squares on the left", "a green triangle and a yellow star", "a heart",
            "an orange diamond next to a purple ring, with a grey cross at the bottom"]


def max_diffs(pairs) -> str:
    return " ".join(f"{name} {(a - b).abs().max().item():.1e}" for name, a, b in pairs)


@torch.no_grad()
def measure(label: str, model_cfg, tokenizer_dir: str, image_size: int) -> None:
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = NLIPModel.from_config(model_cfg, tok).eval()
    out = Path(tempfile.mkdtemp())
    name = f"nlip-exactness-{label}"
    written = write_exports(model, tokenizer_dir, out, ["hf-clip", "open_clip"], Source("-", "-", "-", "-"), name)
    images = torch.randn(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    ids, mask = tok.encode(CAPTIONS, model.text.context_length)
    image, text = model.encode_image(images), model.encode_text(ids, mask)
    logits = model.logit_scale() * image @ text.T
    hf = CLIPModel.from_pretrained(str(written["hf-clip"])).eval()(input_ids=ids, attention_mask=mask,
                                                                      pixel_values=images)
    open_clip.add_model_config(str(written["open_clip"]))
    oc = open_clip.create_model_and_transforms(name, pretrained=str(written["open_clip"] /
                                                                   "open_clip_model.safetensors"))[0].eval()
    oc_image, oc_text = oc.encode_image(images, normalize=True), oc.encode_text(ids, normalize=True)
    print(f"{label:<6} hf-clip:   " + max_diffs([("image", hf.image_embeds, image), ("text", hf.text_embeds, text),
                                                 ("logits", hf.logits_per_image, logits)]))
    print(f"{label:<6} open_clip: " + max_diffs([("image", oc_image, image), ("text", oc_text, text),
                                                 ("logits", oc.logit_scale.exp() * oc_image @ oc_text.T, logits)]))


if __name__ == "__main__":
    tokenizer_dir = sys.argv[1]
    measure("tiny", ModelConfig(), tokenizer_dir, 32)
    paper = load_config("configs/vit-b32-yfcc26m.yaml", ["model.decoder.depth=1", "model.mae.enabled=false"])
    measure("paper", paper.model, tokenizer_dir, 224)
