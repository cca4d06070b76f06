"""The NLIP modules (V_e, T_e, C_d, V_d) and NLIPModel; no DeepSpeed import anywhere in this package."""
from nlip_ds.model.decoder import caption_loss
from nlip_ds.model.nlip import NLIPModel

__all__ = ["NLIPModel", "caption_loss"]
